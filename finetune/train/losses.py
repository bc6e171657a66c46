"""Pure tensor maths shared by the trainers: token cross-entropy, masks, log-probs, and PPO's KL
estimators, GAE, whitening and clipped losses.

Conventions (Hugging Face): ``labels`` are aligned with ``input_ids`` and hold -100 where a token is
not trained; the shift happens here, ``logits[:, t]`` predicts ``labels[:, t + 1]``. Losses are
*sums* over trained tokens: the engine divides by the number of trained tokens of the whole
optimizer step (all micro-batches and ranks), so that every token weighs the same however the
tokens are spread over micro-batches (a mean per micro-batch would over-weight short batches).

Packed rows: the collators set the label of the first token of every sample to -100, so the last
token of one sample never predicts the first token of the next (see ``finetune.train.collate``). The
first token is never a prediction target of its own sample anyway, so this changes no loss.

Everything is computed in fp32 whatever the model's dtype: bf16 log-softmax over a 150k vocabulary
loses about 2 significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _shift(logits_or_hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's output with the label of token t + 1, flattened over batch and time."""
    inputs = logits_or_hidden[:, :-1]
    targets = labels[:, 1:]
    return inputs.reshape(-1, inputs.shape[-1]), targets.reshape(-1)


def token_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions, in fp32.

    logits: (batch, time, vocab); labels: (batch, time) with -100 where not trained.
    Returns a 0-dim fp32 tensor (0.0 when nothing is trained, never NaN).
    """
    flat_logits, targets = _shift(logits, labels)
    return F.cross_entropy(flat_logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Number of tokens that ``token_ce_sum`` sums over (labels[:, 1:] != -100)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum().item())


# --- chunked (fused) linear + cross-entropy ---------------------------------------------------


def logit_transform_from_config(config) -> tuple[float, float | None]:
    """(scale, softcap) that a model applies between lm_head and its logits.

    Knows the attributes of transformers' Cohere (``logit_scale``: multiply), Granite
    (``logits_scaling``: divide) and Gemma 2/3 (``final_logit_softcapping``). A model that transforms
    its logits in any other way must use the plain path (``token_ce_sum`` on ``model(...).logits``).
    """
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    divide = getattr(config, "logits_scaling", None)
    if divide:
        scale /= float(divide)
    softcap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(softcap) if softcap else None)


def _chunk_logits(h, weight, bias, scale, softcap):
    """fp32 logits of one chunk and d(logits)/d(raw logits) factor (None when it is 1)."""
    logits = F.linear(h, weight, bias).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is None:
        return logits, None
    tanh = torch.tanh(logits / softcap)
    # d(softcap * tanh(x / softcap))/dx = 1 - tanh^2
    return tanh * softcap, 1.0 - tanh * tanh


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(h_t @ W^T + b, y_t), gradients computed in the forward pass chunk by chunk.

    Doing the backward work inside forward (as Liger-Kernel's fused linear CE does) means only one
    chunk of fp32 logits exists at any time, in forward and backward alike; backward merely
    scales the stored gradients by the incoming scalar. Costs the same three matmuls per chunk as
    autograd would (logits, dH, dW) and no recomputation.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size, scale, softcap, need_h, need_w):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        need_b = need_w and bias is not None and bias.requires_grad
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        for start in range(0, h.shape[0], chunk_size):
            h_c, y_c = h[start : start + chunk_size], targets[start : start + chunk_size]
            logits, dcap = _chunk_logits(h_c, weight, bias, scale, softcap)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y_c[:, None]).squeeze(1)).sum()
            if not (need_h or need_w):
                continue
            # d CE / d logits = softmax - onehot; then back through softcap and scale
            grad = torch.exp(logits - lse[:, None])
            grad[torch.arange(len(y_c), device=grad.device), y_c] -= 1.0
            if dcap is not None:
                grad *= dcap
            if scale != 1.0:
                grad *= scale
            # Both matmuls in the weight's dtype (bf16 tensor cores; an fp32 matmul of this size is
            # several times slower); dW is summed over chunks in fp32.
            grad_lp = grad.to(weight.dtype)
            if need_h:
                grad_h[start : start + chunk_size] = (grad_lp @ weight).to(h.dtype)
            if need_w:
                grad_w += (grad_lp.t() @ h_c.to(weight.dtype)).float()
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.param_dtypes
        dh = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        db = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return dh, dw, db, None, None, None, None, None, None


def chunked_linear_ce_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 2048,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``token_ce_sum(lm_head(hidden), labels)`` without materialising all fp32 logits.

    hidden: (batch, time, d) last hidden states (after the final norm); weight: (vocab, d) lm_head
    weight; labels: (batch, time) with -100. ``scale``/``softcap``: see
    ``logit_transform_from_config``. Peak extra memory is one (chunk_size, vocab) fp32 block.

    Only trained positions are computed at all (prompt tokens of SFT cost nothing here); selecting
    them needs one device sync per call.
    """
    flat_h, targets = _shift(hidden, labels)
    keep = targets != IGNORE_INDEX
    flat_h, targets = flat_h[keep], targets[keep]
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if flat_h.shape[0] == 0:
        # Keep the graph connected so backward() works on an all-masked micro-batch.
        return hidden.sum().float() * 0.0 + weight.sum().float() * 0.0
    return _LinearCrossEntropySum.apply(
        flat_h, weight, bias, targets, chunk_size, scale, softcap, need_h, need_w
    )


# --- masked helpers ----------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of x where mask is true (mask: bool or 0/1, broadcastable to x). NaN/inf outside ignored."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x where mask is true; 0 (not NaN) where the mask is empty."""
    count = mask.bool().expand_as(x).sum() if dim is None else mask.bool().expand_as(x).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[..., tokens], in fp32.

    logits: (..., vocab); tokens: (...). Shift before calling (logits[:, :-1] with tokens[:, 1:]).
    Negative ids (-100 labels) are read as id 0: their values are meaningless and must be masked.
    Computed as gathered - logsumexp, so no second vocabulary-sized tensor is made.
    """
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    picked = scaled.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


# --- PPO maths (finetune.trainers.ppo) ---------------------------------------------------------
# Tensors are (rows, response tokens), aligned so that column t is the t-th generated token; `mask`
# is 1 on valid response tokens (the stop token included) and must be a prefix of each row.

# exp(20) ~ 5e8 is finite in fp32 and bf16; a larger log-ratio means the minibatch is far
# off-policy and the clipped objective ignores it anyway (gradient zero beyond the clip).
LOG_RATIO_CLAMP = 20.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (Schulman,
    "Approximating KL divergence", 2020). k1 = log p - log p_ref: unbiased, can be negative.
    k3 = (q - 1) - log q with q = p_ref / p: unbiased, always >= 0, lower variance."""
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        # expm1 keeps (q - 1) exact for q near 1, where k3 ~ log_ratio^2 / 2 is tiny.
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r} (k1 or k3)")


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al., 2016) over each row's valid tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t (V = 0 after the last valid token: the episode ends there);
    A_t = delta_t + gamma * lam * A_{t+1}. Returns (advantages, returns = A + V), both 0 outside the
    mask. Values and rewards at masked positions are ignored, whatever they hold.
    """
    m = mask.to(torch.float32)
    values = torch.where(mask.bool(), values.float(), 0.0)
    rewards = torch.where(mask.bool(), rewards.float(), 0.0)
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        next_mask = m[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + values) * m


def masked_moments(x: torch.Tensor, mask: torch.Tensor, all_reduce=None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
    """(mean, unbiased variance, count) of x where mask is 1. `all_reduce(t)` sums a tensor over
    processes (None: this process only), so every rank gets the statistics of the global batch."""
    m = mask.bool()
    stats = torch.stack([m.sum().to(torch.float64), masked_sum(x.double(), m), masked_sum(x.double() ** 2, m)])
    if all_reduce is not None:
        stats = all_reduce(stats)
    count, total, squares = stats[0], stats[1], stats[2]
    mean = total / count.clamp(min=1)
    var = (squares - count * mean**2).clamp(min=0) / (count - 1).clamp(min=1)
    return mean.float(), var.float(), count


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce=None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of all processes with `all_reduce`); 0 outside the
    mask. With fewer than two entries the variance is undefined: x is returned as it is (a lone
    advantage keeps its sign) rather than zeroed by centring or blown up by 1/sqrt(eps)."""
    mean, var, count = masked_moments(x, mask, all_reduce)
    if count < 2:
        out = x
    else:
        out = (x - mean) * torch.rsqrt(var + eps)
        if not shift_mean:
            out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=out.dtype, device=out.device))


@dataclass
class PolicyLoss:
    """Masked sums over a micro-batch's tokens: divide by the token count of the whole minibatch."""

    loss_sum: torch.Tensor  # sum of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    clipped: torch.Tensor  # tokens where the clipped term is the larger one (gradient zero there)
    ratio_sum: torch.Tensor
    approx_kl_sum: torch.Tensor  # sum of (log ratio)^2 / 2, the old -> new KL estimate N+ logs


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2, weight: torch.Tensor | None = None) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al., 2017) as a loss to minimise, per token. `weight`
    (>= 0, broadcastable) scales each token's term in loss_sum: see `token_weights`."""
    log_ratio = (logprobs.float() - old_logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    with torch.no_grad():
        engaged = masked_sum((clipped > unclipped).float(), mask)
        approx_kl = masked_sum(0.5 * log_ratio**2, mask)
        ratio_sum = masked_sum(ratio, mask)
    loss = torch.maximum(unclipped, clipped)
    if weight is not None:
        loss = loss * weight
    return PolicyLoss(masked_sum(loss, mask), engaged, ratio_sum, approx_kl)


@dataclass
class ValueLoss:
    loss_sum: torch.Tensor  # sum of 0.5 * max((V - R)^2, (V_clipped - R)^2)
    clipped: torch.Tensor  # tokens where the clipped error is the larger one (gradient zero there)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip: float = 0.2) -> ValueLoss:
    """The value loss of PPO2 / N+: the new value may move at most `clip` from the rollout's value
    before the clipped term takes over."""
    values = values.float()
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    with torch.no_grad():
        engaged = masked_sum((clipped_err > unclipped_err).float(), mask)
    return ValueLoss(0.5 * masked_sum(torch.maximum(unclipped_err, clipped_err), mask), engaged)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-position entropy of softmax(logits / temperature), in fp32."""
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -beta * kl_t on valid tokens, plus each row's score at its last valid token: the stop
    token itself when there is one (TRL put it one slot later), else the last generated token."""
    rewards = torch.where(mask.bool(), -beta * kl.float(), 0.0)
    last = (mask.long().sum(1) - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores.float()[:, None])


# --- critic-free advantages (trainer.ppo.advantage: grpo | rloo) --------------------------------
# Rows come in groups of `group` consecutive samples of one prompt; one advantage per sequence,
# put on every token of its completion.

GRPO_STD_EPS = 1e-4  # TRL's: a group whose rewards differ by float noise is not blown up


def group_advantages(rewards: torch.Tensor, group: int, kind: str, std: bool = True) -> torch.Tensor:
    """(rows,) sequence rewards -> (rows,) advantages within each group of `group` rows.

    grpo (Shao et al., 2024): (r - mean_g) / (std_g + eps), std unbiased; std=False is Dr. GRPO's
    (Liu et al., 2025) r - mean_g. rloo (Ahmadian et al., 2024): r_i - mean of the other samples
    of its prompt = group / (group - 1) * (r_i - mean_g)."""
    rows = rewards.shape[0]
    if group < 2 or rows % group:
        raise ValueError(f"{rows} rows do not split into groups of {group} >= 2 samples per prompt")
    r = rewards.float().view(rows // group, group)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        out = centred / (r.std(1, keepdim=True) + GRPO_STD_EPS) if std else centred
    elif kind == "rloo":
        out = centred * (group / (group - 1))
    else:
        raise ValueError(f"unknown group advantage {kind!r} (grpo or rloo)")
    return out.reshape(rows)


def token_weights(mask: torch.Tensor, norm: str, total_tokens: float, total_rows: float,
                  max_new_tokens: int) -> torch.Tensor:
    """Per-token weights w such that sum(w * loss_t) / total_tokens is the loss of `norm`:
    token_mean: every token of the minibatch alike (1); seq_mean: each sequence's token mean,
    averaged over sequences (GRPO's 1/G sum 1/|o_i| sum_t); constant: the token sum over
    rows x max_new_tokens (Dr. GRPO: no length bias from the 1/|o_i|). totals: the minibatch's,
    all processes together."""
    m = mask.float()
    if norm == "token_mean":
        return m
    if norm == "seq_mean":
        return m * (total_tokens / (total_rows * m.sum(1, keepdim=True).clamp(min=1)))
    if norm == "constant":
        return m * (total_tokens / (total_rows * max_new_tokens))
    raise ValueError(f"unknown loss normalisation {norm!r}")
