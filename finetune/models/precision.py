"""The one place that decides which floating-point precision this machine trains and infers in.

Every caller (weight dtype, accelerate's mixed precision / autocast, QLoRA's compute dtype,
reward-model loading, inference, the attention kernel, `finetune doctor`) asks here, so they agree.

bf16 only where the GPU computes it natively (compute capability >= 8.0: Ampere, Hopper, ...).
``torch.cuda.is_bf16_supported()`` is also true on a V100 or T4, where bf16 is emulated (slow, and
PyTorch's FlashAttention refuses it: "Ampere or newer"); those GPUs get fp16, which autocast runs
natively and accelerate pairs with a loss scaler. No CUDA: fp32.
"""

from __future__ import annotations

import torch

# PyTorch's FlashAttention (and native bf16 matmuls) need this compute capability or newer.
AMPERE = (8, 0)


def gpu_capability(device=None) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    # get_device_properties, not get_device_capability: torch.compile folds it to a constant, so
    # the attention can ask inside a compiled layer without a graph break.
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


def native_bf16(device=None) -> bool:
    """bf16 computed in hardware on this CUDA device (not emulated)."""
    capability = gpu_capability(device)
    if capability is None:
        return False
    if torch.version.hip:  # ROCm reports gfx versions as capabilities; every bf16 claim there is native
        return torch.cuda.is_bf16_supported()
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.3 has no including_emulation
        native = torch.cuda.is_bf16_supported()
    return native and capability >= AMPERE


def half_dtype(device=None) -> torch.dtype | None:
    """The 16-bit dtype this GPU computes natively: bf16 (Ampere+), else fp16; None without CUDA."""
    if gpu_capability(device) is None:
        return None
    return torch.bfloat16 if native_bf16(device) else torch.float16


def auto_precision(device=None) -> str:
    """`precision: auto` as accelerate's mixed_precision value: "bf16" | "fp16" | "no" (fp32)."""
    half = half_dtype(device)
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(half, "no")


def mixed_precision(precision: str, device=None) -> str:
    """A recipe's run.precision (auto | bf16 | fp16 | fp32) as accelerate's mixed_precision value."""
    if precision == "auto":
        return auto_precision(device)
    return {"fp32": "no"}.get(precision, precision)


def inference_dtype(device=None) -> torch.dtype:
    """Weights for generation / scoring on `device` (None: the GPU if there is one): the GPU's
    native 16-bit dtype, fp32 on the CPU."""
    if device is not None and torch.device(device).type != "cuda":
        return torch.float32
    return half_dtype(device) or torch.float32


def flash_capable(device=None) -> bool:
    """Whether PyTorch's FlashAttention kernels run on this CUDA device (sm80 or newer)."""
    capability = gpu_capability(device)
    return capability is not None and (bool(torch.version.hip) or capability >= AMPERE)
