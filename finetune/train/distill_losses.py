"""Pure maths of knowledge distillation: divergences between a teacher's and a student's
next-token distributions at the student's trained positions.

Notation: at one position, p = softmax(teacher logits / T) and q = softmax(student logits / T),
T the temperature; KL(a||b) = sum_v a_v (log a_v - log b_v).

- forward_kl: KL(p||q), the classic distillation loss (Hinton et al. 2015; the teacher's soft
  labels): mass-covering, the student spreads over every reply the teacher would give.
- reverse_kl: KL(q||p): mode-seeking, the student concentrates on what the teacher finds likely.
- jsd: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), with
  m = beta p + (1 - beta) q: beta KL(p||m) + (1 - beta) KL(q||m). As TRL's
  GKDTrainer.generalized_jsd_loss, beta = 0 is forward_kl and beta = 1 reverse_kl (the interior
  formula tends to beta x forward KL and (1 - beta) x reverse KL at the two ends).
- top_k: both distributions coarse-grained to the teacher's k most likely tokens plus one bucket
  holding all other tokens' mass; the divergence of those (k + 1)-way distributions. It is what
  distillation from stored top-k teacher log-probs can compute: a lower bound of the full
  divergence (coarse-graining never increases a KL or JSD), equal to it when the other tokens
  hold the same share under both models, and it ignores how the student spreads its rest-bucket
  mass among the non-top-k tokens.
- temperature: both logits are divided by T (as TRL; Hinton's T^2 gradient factor is not applied,
  so gradients shrink as T grows: raise optim.lr with T if needed).

Everything is computed in fp32. Sums over trained positions are returned (the engine divides the
step's summed loss by its trained tokens), like token_ce_sum. As everywhere, ``logits[:, t]``
predicts ``labels[:, t + 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from finetune.train.losses import IGNORE_INDEX

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a||b) over the last dim from log-probabilities (finite inputs)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def coarse_grain(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., k + 1) log-probs: the tokens of `index` (..., k), then all other tokens together."""
    picked = logp.gather(-1, index)
    rest = torch.logsumexp(logp.scatter(-1, index, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([picked, rest], dim=-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: str = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """Per-position divergence, shape (...,), for logits (..., vocab) of the same positions."""
    if loss not in DIVERGENCES:
        raise ValueError(f"loss must be one of {DIVERGENCES}, got {loss!r}")
    q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if top_k is not None and top_k < p.shape[-1]:
        index = teacher_logits.topk(top_k, dim=-1).indices
        p, q = coarse_grain(p, index), coarse_grain(q, index)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return kl(p, q)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return kl(q, p)
    m = torch.logsumexp(torch.stack([p + math.log(beta), q + math.log1p(-beta)]), dim=0)
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """(rows, time - 1) bool: positions t whose logits predict a trained label[t + 1]."""
    return labels[:, 1:] != IGNORE_INDEX


def distill_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 loss: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed divergence, summed NLL of the labels) over the trained positions, fp32 0-dim tensors.

    student_logits / teacher_logits: (rows, time, vocab) of the same tokens; a wider one (a vocabulary
    padded past the tokenizer) is cut to the narrower. labels: (rows, time), -100 where not trained.
    Only the trained positions are gathered before the softmaxes, so prompts cost nothing here.
    """
    mask = trained_positions(labels)
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    student = student_logits[:, :-1][mask]
    teacher = teacher_logits[:, :-1][mask][..., :width]
    div = divergence(student[..., :width], teacher, loss, beta, temperature, top_k).sum()
    nll = F.cross_entropy(student.float(), labels[:, 1:][mask], reduction="sum")
    return div, nll
