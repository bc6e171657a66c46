"""Pure tensor maths shared by the trainers: token cross-entropy, masks, log-probs.

Conventions (Hugging Face): ``labels`` are aligned with ``input_ids`` and hold -100 where a token is
not trained; the shift happens here, ``logits[:, t]`` predicts ``labels[:, t + 1]``. Losses are
*sums* over trained tokens: the engine divides by the number of trained tokens of the whole
optimizer step (all micro-batches and ranks), so that every token weighs the same however the
tokens are spread over micro-batches (a mean per micro-batch would over-weight short batches).

Packed rows: the collators set the label of the first token of every sample to -100, so the last
token of one sample never predicts the first token of the next (see ``finetune.collate``). The
first token is never a prediction target of its own sample anyway, so this changes no loss.

Everything is computed in fp32 whatever the model's dtype: bf16 log-softmax over a 150k vocabulary
loses about 2 significant digits.
"""

from __future__ import annotations

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
