"""Attention that never crosses sample boundaries in a padding-free (packed) row, without flash-attn.

``enable_packed_attention(model)`` switches a transformers model to the attention implementation
"finetune_varlen". The engine enables it when it feeds ``collate_flat`` batches (several samples
concatenated in one row); it is also correct, and plain sdpa, for padded batches and generation.

How it plugs into transformers 5 (read from 5.23's source):
- ``AttentionInterface.register(name, fn)`` adds ``fn`` to the global table that every model's
  attention layer looks up with ``config._attn_implementation``; ``fn(module, query, key, value,
  attention_mask, dropout=, scaling=, **kwargs)`` gets (batch, heads, time, dim) tensors and
  returns ((batch, time, heads, dim), weights). The model's forward kwargs reach it, so the flat
  collator's ``cu_seq_lens_q/k`` and ``max_length_q/k`` arrive here, and so does position_ids.
- ``masking_utils.create_causal_mask`` builds no mask at all for a name missing from
  ``AttentionMaskInterface`` (it returns None, dropping the padding mask too). So a mask function
  is registered under the same name: None when there is no padding and no cache (we separate
  samples ourselves, no dense (time x time) mask is built), else exactly sdpa's mask.
- ``model.set_attn_implementation(name)`` accepts any registered name and sets it on the config
  and all sub-configs.

Kernels: on CUDA (sm80+) in bf16/fp16, PyTorch's own FlashAttention varlen kernel
``torch.nn.attention.varlen.varlen_attn`` (no flash-attn package). Its signature changed between
torch releases (2.11 has no ``enable_gqa``: KV heads are repeated; ``window_size`` may be missing:
sliding windows then use the fallback), so it is read with ``inspect``. Under autocast q, k and v
are cast to autocast's dtype first: with fp32 master weights the rotary multiply promotes q and k
back to fp32, and after QLoRA's k-bit preparation all three arrive in fp32, which would leave the
flash kernel. Elsewhere (CPU, fp32, pre-Ampere GPUs, attention dropout) SDPA once per sample
(O(sum of squared sample lengths), no T x T mask); inside torch.compile, where per-sample shapes
would break the graph, one SDPA call with a block-diagonal bool mask.
Attention logit softcapping (Gemma 2) and attention sinks (gpt-oss) have no SDPA or varlen kernel
here: those layers run the model's own eager attention, per sample in a packed row (each with its
causal / sliding-window mask) and with the additive form of the mask in a padded batch
(``special_attention`` names them for the plan).
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from finetune.models.precision import flash_capable

ATTENTION_NAME = "finetune_varlen"


@functools.cache
def _varlen_kernel():
    """(varlen_attn, its parameter names), or (None, empty) on a torch without it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def cu_seq_lens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """int32 offsets of the samples in the flattened (batch * time) tokens.

    A sample starts at every row start and wherever the position does not continue the previous
    one (the rule transformers' ``find_packed_sequence_indices`` uses).
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    offsets = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([position_ids.numel()], device=offsets.device, dtype=offsets.dtype)
    return torch.cat([offsets, end]).to(torch.int32)


def _segments(query, cu_seq_lens_q, position_ids) -> torch.Tensor:
    """Sample offsets over the flattened tokens, from what the model got."""
    batch, _, time, _ = query.shape
    if cu_seq_lens_q is not None:
        cu = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
        # Checking costs a device sync per layer on CUDA, and a graph break inside a compiled
        # layer (which, under activation checkpointing, leaves the whole layer uncompiled).
        if not query.is_cuda and not torch.compiler.is_compiling() and int(cu[-1]) != batch * time:
            raise ValueError(f"cu_seq_lens end at {int(cu[-1])} but the batch holds {batch * time} tokens")
    elif position_ids is not None:
        cu = cu_seq_lens_from_position_ids(position_ids.expand(batch, time).to(query.device))
    else:
        cu = torch.arange(0, batch * time + 1, time, device=query.device, dtype=torch.int32)
    return cu


def _window_mask(allowed: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor:
    """``allowed`` (bool, query x key) restricted to causal and to the sliding window (transformers'
    sliding_window_overlay: kv_idx > q_idx - window), with triangles: no distance matrix."""
    if causal:
        allowed = allowed.tril()
    if window is not None:
        allowed = allowed.triu(-(window - 1))
        if not causal:
            allowed = allowed.tril(window - 1)
    return allowed


def _flat_tokens(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, time, d) -> (1, heads, batch * time, d)"""
    batch, heads, time, dim = t.shape
    return t.transpose(0, 1).reshape(1, heads, batch * time, dim)


def _per_sample_sdpa(query, key, value, cu, causal, window, dropout, scaling) -> torch.Tensor:
    """Fallback: one SDPA call per sample. No (tokens x tokens) tensor, and each sample's cost
    is its own length squared (one call over the whole row with a block-diagonal mask spends
    the row length squared, and SDPA expands a bool mask to a float one of that size)."""
    batch, heads, time, _ = query.shape
    q, k, v = _flat_tokens(query), _flat_tokens(key), _flat_tokens(value)
    gqa = heads != k.shape[1]
    if gqa and q.is_cuda:  # CUDA's memory-efficient kernel (fp32, pre-Ampere) takes no enable_gqa
        k, v = k.repeat_interleave(heads // k.shape[1], dim=1), v.repeat_interleave(heads // v.shape[1], dim=1)
        gqa = False
    lengths = cu.diff().tolist()  # a device sync per layer on CUDA: this is the slow path already
    outs = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True):
        n = qs.shape[2]
        if n == 0:
            continue
        mask = None
        if window is not None and window < n:
            mask = _window_mask(torch.ones(n, n, dtype=torch.bool, device=q.device), causal, window)
        outs.append(F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=causal and mask is None, scale=scaling,
            enable_gqa=gqa,
        ))
    out = torch.cat(outs, dim=2)
    return out.reshape(heads, batch, time, -1).permute(1, 2, 0, 3)


def _block_mask_sdpa(query, key, value, cu, causal, window, dropout, scaling) -> torch.Tensor:
    """Fallback inside torch.compile: every token in one SDPA call with a block-diagonal bool mask
    from int32 sample ids (traceable: no host copy of the offsets, shapes do not follow the data)."""
    batch, heads, time, _ = query.shape
    n = batch * time
    pos = torch.arange(n, device=query.device, dtype=torch.int32)
    sample = torch.searchsorted(cu, pos, right=True, out_int32=True)
    mask = _window_mask(sample[:, None] == sample[None, :], causal, window)
    out = F.scaled_dot_product_attention(
        _flat_tokens(query), _flat_tokens(key), _flat_tokens(value), attn_mask=mask, dropout_p=dropout,
        scale=scaling, enable_gqa=heads != key.shape[1],
    )
    return out.reshape(heads, batch, time, -1).permute(1, 2, 0, 3)


def _flash_varlen(query, key, value, cu, max_len, causal, window, scaling) -> torch.Tensor:
    """PyTorch core FlashAttention over the flattened tokens, samples delimited by cu."""
    kernel, params = _varlen_kernel()
    batch, heads, time, _ = query.shape

    def flat(t):  # (batch, heads, time, d) -> (batch * time, heads, d)
        return t.transpose(1, 2).reshape(batch * time, t.shape[1], t.shape[-1])

    q, k, v = flat(query), flat(key), flat(value)
    kwargs = {"scale": scaling}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # torch 2.11: query head h reads KV head h // n_rep, as transformers' repeat_kv
            n_rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    if "window_size" in params:
        left = -1 if window is None else window - 1
        kwargs["window_size"] = (left, 0 if causal else left)
    else:
        kwargs["is_causal"] = causal
    out = kernel(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out.reshape(batch, time, heads, -1)


def _kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype q, k and v meet the kernel in: autocast's while it is on (what SDPA would cast
    them to itself), else the query's."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return query.dtype


def _can_use_flash(device: torch.device, dtype: torch.dtype, head_dim: int, dropout: float,
                   window: int | None) -> bool:
    """Whether the FlashAttention varlen kernel takes this call (else the SDPA fallback)."""
    kernel, params = _varlen_kernel()
    return (
        kernel is not None
        and device.type == "cuda"
        and dtype in (torch.float16, torch.bfloat16)
        and flash_capable(device)  # sm80+: on a V100 / T4 the kernel raises "Ampere or newer"
        and dropout == 0.0  # the varlen kernel has no dropout
        and head_dim <= 256
        and (window is None or "window_size" in params)
    )


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: varlen over samples, or sdpa when a mask is given."""
    special = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
    if not special and (attention_mask is not None or query.shape[2] != key.shape[2]):
        # A padded batch, or decoding against a cache: exactly sdpa (the mask carries everything).
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        return _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                sliding_window, cu_seq_lens_q, position_ids, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    cu = _segments(query, cu_seq_lens_q, position_ids)
    dtype = _kernel_dtype(query)
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    head_dim = max(query.shape[-1], value.shape[-1])
    if _can_use_flash(query.device, dtype, head_dim, dropout, sliding_window):
        max_len = int(max_length_q) if max_length_q is not None else int(cu.diff().max())
        out = _flash_varlen(query, key, value, cu, max_len, causal, sliding_window, scaling)
    elif torch.compiler.is_compiling():
        out = _block_mask_sdpa(query, key, value, cu, causal, sliding_window, dropout, scaling)
    else:
        out = _per_sample_sdpa(query, key, value, cu, causal, sliding_window, dropout, scaling)
    return out.contiguous(), None


def _eager_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window,
                     cu_seq_lens_q, position_ids, **kwargs) -> tuple[torch.Tensor, None]:
    """Softcapping or sinks: the model's own eager attention (its module's ``eager_attention_forward``),
    which applies them; sdpa has neither. Packed rows go one sample at a time, each with its own
    causal (and sliding-window) mask, so no sample sees another and no (tokens x tokens) mask is built."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    extra = {k: v for k, v in kwargs.items() if k in ("softcap", "s_aux")}

    def run(q, k, v, mask):
        out, _ = eager(module, q, k, v, mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window,
                       **extra)
        return out

    if attention_mask is not None or query.shape[2] != key.shape[2]:
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # sdpa's form -> additive
            attention_mask = torch.zeros_like(attention_mask, dtype=query.dtype).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        return run(query, key, value, attention_mask), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    batch, heads, time, _ = query.shape
    q, k, v = _flat_tokens(query), _flat_tokens(key), _flat_tokens(value)
    lengths = _segments(query, cu_seq_lens_q, position_ids).diff().tolist()
    outs = []
    for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True):
        n = qs.shape[2]
        if n == 0:
            continue
        allowed = _window_mask(torch.ones(n, n, dtype=torch.bool, device=q.device), causal, sliding_window)
        mask = torch.zeros(n, n, dtype=qs.dtype, device=q.device).masked_fill(~allowed, torch.finfo(qs.dtype).min)
        outs.append(run(qs, ks, vs, mask[None, None]))  # (1, n, heads, d)
    out = torch.cat(outs, dim=1)
    return out.reshape(batch, time, heads, -1).contiguous(), None


def special_attention(model) -> str | None:
    """What in this model the varlen kernels cannot compute (softcapping, sinks), for the plan; else None."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    found = []
    if getattr(config, "attn_logit_softcapping", None) is not None:
        found.append("attention logit softcapping")
    if any(name.endswith(".sinks") or name == "sinks" for name, _ in model.named_parameters()):
        found.append("attention sinks")
    if not found:
        return None
    return (f"{config.model_type} uses {' and '.join(found)}: packed attention runs the model's eager "
            "attention one sample at a time (slower than varlen; no cross-sample attention)")


def packed_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask builder registered beside the attention: None lets the attention split samples itself.

    With padding or a non-empty cache it returns sdpa's mask, so those cases stay plain sdpa.
    """
    no_cache = q_length == kv_length and int(q_offset) == 0 and int(kv_offset) == 0
    if attention_mask is None and no_cache:
        return None
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )


def register_packed_attention() -> str:
    """Register "finetune_varlen" with transformers (idempotent); returns the name."""
    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, packed_attention_mask)
    return ATTENTION_NAME


def enable_packed_attention(model):
    """Make ``model`` (a transformers model, PEFT-wrapped or not) use "finetune_varlen"; returns it.

    Needed whenever the model sees ``collate_flat`` batches, unless it already uses
    flash_attention_2/3 (which read the same cu_seq_lens). Harmless for padded batches.
    """
    register_packed_attention()
    model.set_attn_implementation(ATTENTION_NAME)
    return model
