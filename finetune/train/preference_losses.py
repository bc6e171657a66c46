"""Pure maths of direct preference optimisation: per-sequence log-probs and the pair losses.

Notation: for a pair (x, y_w, y_l), pi(y|x) is the policy's summed log-prob of the response tokens
(the trained tokens of the chat-template masks), ref(y|x) the reference's, |y| the number of those
tokens, h = [pi(y_w) - ref(y_w)] - [pi(y_l) - ref(y_l)] and eps the label smoothing.

- sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta h); with eps > 0 the conservative DPO of
  Mitchell (2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- robust (rDPO, Chowdhury et al. 2024): unbiased under a preference flip rate eps,
  [-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)] / (1 - 2 eps).
- ipo (Azar et al. 2023, eq. 17): (h' - 1 / (2 beta))^2 where h' uses log-ratios divided by |y|,
  as TRL does with the authors' agreement (the paper's results use the length-normalised form).
- simpo (Meng et al. 2024): no reference; -log sigmoid(beta pi(y_w)/|y_w| - beta pi(y_l)/|y_l| - gamma),
  label smoothing as in cDPO.
Implicit rewards (what `rewards/*` metrics report): beta (pi - ref) for DPO-style losses, the paper's
beta pi / |y| for SimPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from finetune.train.losses import IGNORE_INDEX, gather_logprobs

LOSSES = ("sigmoid", "robust", "ipo", "simpo")
REFERENCE_FREE = ("simpo",)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor,
                   num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob, trained-token count) per sample, in fp32.

    logits: (rows, time, vocab); labels: (rows, time), -100 where not trained; sample_ids: (rows, time)
    the sample each token belongs to (a padded batch: the row; a flat row: the segment). As in
    token_ce_sum, logits[:, t] scores labels[:, t + 1], which must belong to the same sample (the
    collators mask every sample's first label, so no prediction crosses a boundary).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logps = gather_logprobs(logits[:, :-1], targets)
    ids = sample_ids[:, 1:].reshape(-1)
    zeros = torch.zeros(num_samples, dtype=torch.float32, device=logits.device)
    sums = zeros.scatter_add(0, ids, torch.where(mask, logps, 0.0).reshape(-1))
    counts = zeros.scatter_add(0, ids, mask.reshape(-1).float())
    return sums, counts


@dataclass
class PairLoss:
    """Per-pair tensors of shape (pairs,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # detached implicit rewards
    rejected_rewards: torch.Tensor

    def stats(self) -> dict[str, torch.Tensor]:
        """Sums over the pairs, for the engine to log as means per pair."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {"rewards/chosen": self.chosen_rewards.sum(), "rewards/rejected": self.rejected_rewards.sum(),
                "rewards/margin": margin.sum(), "rewards/accuracy": (margin > 0).float().sum()}


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    loss = -F.logsigmoid(z)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-z)


def preference_loss(loss: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, beta: float,
                    label_smoothing: float = 0.0, gamma: float = 0.0) -> PairLoss:
    """Per-pair loss of one of LOSSES from summed log-probs (see the module docstring).

    ref_* may be None only for a reference-free loss; *_tokens are the responses' token counts.
    """
    eps = label_smoothing
    if loss in REFERENCE_FREE:
        chosen = policy_chosen / chosen_tokens.clamp(min=1)
        rejected = policy_rejected / rejected_tokens.clamp(min=1)
        losses = _smoothed(beta * (chosen - rejected) - gamma, eps)
        return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = _smoothed(beta * h, eps)
    elif loss == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss == "ipo":
        h_mean = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (h_mean - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r} (one of {', '.join(LOSSES)})")
    return PairLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
