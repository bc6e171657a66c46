"""launch.strategy fsdp: FSDP2 (torch's own `fully_shard`) applied by finetune, on GPUs and CPUs alike.

Why not accelerate's FSDP mode: accelerate shards only on GPUs (a CPU process group falls back to
plain data parallel), so its FSDP path could never run in CPU CI. torch's `fully_shard` shards on
any device mesh (gloo CPU processes included), so the code path a GPU cluster runs is the one the
CPU tests run. accelerate stays the launcher and the precision policy: the model goes through
`prepare_model(evaluation_mode=True)`, which adds its autocast and nothing else (no DDP wrapper:
DTensor parameters cannot be DDP-wrapped; with evaluation_mode accelerate skips it).

What sharding means for the rest of the engine:
- wrapping: one FSDP unit per block class the model declares in `_no_split_modules` (decoder
  layers; Gemma-3's text and vision layers), then the root (embeddings, final norm, head).
  Every rank built the same weights (same seed or the same files), so each keeps its slice.
- gradient accumulation: FSDP2 reduce-scatters every micro-batch's gradients into the sharded
  `.grad` (averaged over ranks, as DDP). `set_requires_gradient_sync(False)` would save that
  communication but keeps every layer's *unsharded* fp32 gradient until the step's last
  micro-batch: DDP-sized gradient memory, which is what FSDP is chosen to avoid (and what the
  plan's memory estimate, gradients / processes, assumes). The sum is the same within rounding.
- clipping: accelerate's clip_grad_norm_ is DTensor-aware; its total norm is a DTensor, made a
  plain tensor here for the numeric guard and the logs.
- checkpoints: model and optimizer state through torch.distributed.checkpoint (DCP), each rank
  writing its own shard file into the checkpoint's .tmp directory (checkpoint.py keeps the
  atomic, manifest-verified layout around it). `final/` is always consolidated: the full state
  dict is gathered to rank 0 (on the CPU) and written with save_pretrained (safetensors).
- not supported here, refused with one line: 4/8-bit models (bitsandbytes' packed weights are not
  shardable by fully_shard), fp16 (its loss scaler is not verified on sharded gradients).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from finetune.errors import RecipeError

SHARDED_DIR = "sharded"  # checkpoints/step-N/sharded/: DCP's .metadata and one __<rank>_0.distcp per rank


def fsdp_requested(recipe) -> bool:
    """The recipe's strategy, or a cluster's own `accelerate launch` with an FSDP config."""
    env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    return recipe.launch.strategy == "fsdp" or env


@contextlib.contextmanager
def accelerate_without_fsdp():
    """While the Accelerator is built: a cluster's FSDP launch config must not switch accelerate
    into its own FSDP mode, which would try to shard the model a second time."""
    old = os.environ.get("ACCELERATE_USE_FSDP")
    if old is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if old is not None:
            os.environ["ACCELERATE_USE_FSDP"] = old


def check_supported(recipe, accelerator) -> None:
    if recipe.model.quantize:
        raise RecipeError("launch.strategy fsdp: a 4/8-bit (model.quantize) base is not sharded by FSDP2 here; "
                          "use ddp (each process holds the quantized base)")
    if accelerator.mixed_precision == "fp16":
        raise RecipeError("launch.strategy fsdp: run.precision resolves to fp16 here (no bf16 on this GPU), whose "
                          "loss scaler is not verified on sharded gradients; set run.precision=fp32 or use ddp")


def block_classes(model: torch.nn.Module) -> set[str]:
    """Class names of the model's own blocks (`_no_split_modules` of it and its sub-models, as
    transformers' device maps use them), only those actually present."""
    present = {type(m).__name__ for m in model.modules()}
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    return names & present


def shard(model: torch.nn.Module, accelerator, recipe) -> torch.nn.Module:
    """fully_shard each block, then the root, over all processes; returns the (same) model.

    The parameters become DTensors holding this rank's slice, moved to the mesh's device (a GPU
    never holds the whole model). Blocks are sharded innermost first (FSDP2's order)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    check_supported(recipe, accelerator)
    device = accelerator.device
    mesh = init_device_mesh(device.type, (accelerator.num_processes,))
    blocks = block_classes(model)
    if not blocks:
        raise RecipeError(f"launch.strategy fsdp: {type(model).__name__} declares no block classes "
                          "(_no_split_modules) to shard one by one; use ddp")
    for module in reversed(list(model.modules())):
        if module is not model and type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def prepare(accelerator, model, optimizer):
    """accelerate's autocast on the sharded model and its optimizer wrapper; no DDP, no move."""
    # evaluation_mode: accelerate's "mixed precision only, no data-parallel wrapper" (the model
    # stays in train mode; the name is accelerate's).
    model = accelerator.prepare_model(model, device_placement=False, evaluation_mode=True)
    return model, accelerator.prepare_optimizer(optimizer)


def plain(value):
    """A DTensor (e.g. the total gradient norm) as the full plain tensor; anything else unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def full_state_dict(model) -> dict:
    """The whole model's state dict on rank 0's CPU (empty on the other ranks); all ranks call it.

    Tied parameters (embeddings and head) come back as separate copies; they are made one tensor
    again so save_pretrained drops the tied name, as it does for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for first, *aliases in names.values():
        for alias in aliases:
            if first in state and alias in state:
                state[alias] = state[first]
    return state


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _trained_only():
    """Checkpoints hold the trained parameters: with an adapter, its weights, not the frozen base
    (loaded from model.name again on resume), as the unsharded adapter checkpoints do."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_sharded(directory: Path, model, optimizer) -> None:
    """Every rank writes its shard of the model and optimizer state (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, _torch_optimizer(optimizer), options=_trained_only())
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    except CheckpointException as e:  # DCP gathers every rank's failure; the caller handles OSError
        failures = list(getattr(e, "failures", {}).values())
        cause = failures[0] if failures else e
        raise OSError(getattr(cause, "errno", None), f"sharded save failed: {cause}") from e


def load_sharded(directory: Path, model, optimizer) -> None:
    """Reads this rank's slice of the model and optimizer state back (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = _torch_optimizer(optimizer)
    model_state, optim_state = get_state_dict(model, optimizer, options=_trained_only())
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))  # fails on a key the checkpoint lacks
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=_trained_only())
    # strict=False lets the frozen base stay as loaded; anything else missing is an error.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    wrong = [k for k in result.missing_keys if k not in frozen] + list(result.unexpected_keys)
    if wrong:
        raise RuntimeError(f"{directory}: sharded weights do not match the model ({wrong[:3]})")
