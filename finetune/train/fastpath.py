"""The supervised fast path: fused linear cross-entropy, compiled decoder layers, sync-free batches.

Three switches, each measured on its own by ``finetune bench`` (docs/benchmarks.md):

- ``run.chunked_ce`` (true | false | auto): the loss never materialises (tokens x vocab) logits in
  fp32. The output head's call inside the model's own forward is tapped: instead of the logits it
  computes the summed cross-entropy chunk by chunk (``losses._LinearCrossEntropySum``: fp32 logits
  of one chunk at a time, gradients computed in the same pass) over the *trained positions only*,
  so the label mask is respected by construction (TRL #3781 lost it with Liger's fused loss). The
  model is still called through its wrapper (accelerate's autocast, DDP hooks, PEFT), so mixed
  precision and gradient sync stay what they are. ``auto``: on with CUDA when the head is a plain
  ``nn.Linear`` and the run is not FSDP/ZeRO-3.
- ``run.compile``: ``torch.compile`` of each decoder layer in place (``nn.Module.compile``: the
  state-dict keys do not change, so checkpoints, adapters and merge are unaffected).
- sync-free batches (always on; a bench switch): the collator counts trained tokens and the
  loss positions on the CPU and pins its tensors, so the step copies them with ``non_blocking``
  and never waits on the GPU for a count; transformers' per-forward probe for packed sequences
  (a ``.all()`` on the GPU) is skipped for padding-free batches, whose attention
  (``finetune.train.attention``) reads the sample offsets itself.

    fast = fastpath.setup(recipe, model)          # after load_model / enable_packed_attention
    task = SupervisedTask(..., collate=fast.wrap_collate(collate), loss_sum=fast.loss_sum,
                          count_tokens=fast.count_tokens)
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from finetune.errors import RecipeError
from finetune.train.collate import Batch
from finetune.train.losses import (
    IGNORE_INDEX,
    _LinearCrossEntropySum,
    count_trained_tokens,
    logit_transform_from_config,
)

# Trained positions per chunk: 2048 x 152k vocab fp32 logits = 1.2 GB, plus as much again for their
# softmax gradient, whatever the micro-batch's size (full logits of 16k tokens: 10 GB in fp32).
CHUNK_SIZE = 2048


# ----------------------------------------------------------------------------------------------
# Settings (read with defaults, so this module works before the recipe keys exist)


def _run_setting(recipe, name: str, default):
    return getattr(recipe.run, name, default) if recipe is not None else default


def _sharded_run(recipe) -> bool:
    """FSDP / ZeRO-3: the head's weight is a shard outside its forward; the tap is not proven there."""
    strategy = getattr(getattr(recipe, "launch", None), "strategy", "ddp")
    env = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3"
    return strategy in ("fsdp", "zero3") or env


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/compile wrappers and a PEFT adapter."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def chunked_ce_problem(model: torch.nn.Module, recipe=None) -> str | None:
    """Why the fused loss cannot be used for this model (None when it can)."""
    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return "the model has no output head (get_output_embeddings() is None)"
    if type(head) is not torch.nn.Linear:
        # peft modules_to_save / trainable-token wrappers, quantized heads: their weight is not one tensor.
        return f"the output head is a {type(head).__name__}, not a plain torch.nn.Linear"
    if recipe is not None and _sharded_run(recipe):
        return "FSDP / ZeRO-3 shard the head's weight (not supported by the fused loss yet)"
    return None


def use_chunked_ce(recipe, model) -> bool:
    mode = _run_setting(recipe, "chunked_ce", "auto")
    problem = chunked_ce_problem(model, recipe)
    if mode is True or mode == "true":
        if problem:
            raise RecipeError(f"run.chunked_ce: {problem}; set run.chunked_ce=false (or auto)")
        return True
    if mode in (False, "false"):
        return False
    return problem is None and torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# Sync-free batches


@dataclass
class FastBatch(Batch):
    """A Batch whose counts and loss positions were computed on the CPU by the collator.

    loss_index: flat (rows * time) positions whose next token is trained; loss_targets: those
    next tokens. Tensors are pinned (on a CUDA machine), so ``to`` copies without waiting.
    """

    trained_tokens: int = 0
    loss_index: torch.Tensor | None = None
    loss_targets: torch.Tensor | None = None

    def to(self, device, non_blocking: bool = True) -> FastBatch:
        moved = super().to(device, non_blocking=non_blocking)
        return dataclasses.replace(
            moved,
            loss_index=self.loss_index.to(device, non_blocking=non_blocking),
            loss_targets=self.loss_targets.to(device, non_blocking=non_blocking),
        )


def loss_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions t whose label t + 1 is trained, those labels), row-major over (rows, time)."""
    trained = torch.zeros_like(labels, dtype=torch.bool)
    trained[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    index = trained.reshape(-1).nonzero().squeeze(1)
    return index, labels.reshape(-1)[index + 1]


def fast_batch(batch: Batch, pin: bool) -> FastBatch:
    index, targets = loss_positions(batch.labels)
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}
    out = FastBatch(**fields, trained_tokens=int(index.numel()), loss_index=index, loss_targets=targets)
    if not pin:
        return out
    tensors = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seq_lens", "loss_index", "loss_targets")
    return dataclasses.replace(out, **{
        name: getattr(out, name).pin_memory() for name in tensors if getattr(out, name) is not None
    })


def wrap_collate(collate: Callable[[list], Batch], pin: bool | None = None) -> Callable[[list], FastBatch]:
    """The collator, plus CPU-side counts / loss positions and pinned tensors."""
    pin = torch.cuda.is_available() if pin is None else pin

    def collate_fast(units: list) -> FastBatch:
        return fast_batch(collate(units), pin)

    return collate_fast


def count_tokens(batch: Batch) -> int:
    """The engine's count_tokens: free for a FastBatch, a device sync for a plain Batch on GPU."""
    if isinstance(batch, FastBatch):
        return batch.trained_tokens
    return count_trained_tokens(batch.labels)


_SKIP_PACKED_PROBE = contextvars.ContextVar("finetune_skip_packed_probe", default=False)
_PROBE_PATCHED = False


def _install_packed_probe_skip() -> bool:
    """Let transformers skip its packed-sequence probe inside ``skip_packed_probe()``.

    ``masking_utils.find_packed_sequence_indices`` ends in ``(...).all()`` read on the host: one
    GPU drain per forward. finetune_varlen ignores the mask it would feed (the attention reads the
    sample offsets from cu_seq_lens), so for our padding-free batches None is the same answer.
    """
    global _PROBE_PATCHED
    if _PROBE_PATCHED:
        return True
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        return False

    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if _SKIP_PACKED_PROBE.get():
            return None
        return original(position_ids, *args, **kwargs)

    masking_utils.find_packed_sequence_indices = find_packed_sequence_indices
    _PROBE_PATCHED = True
    return True


@contextlib.contextmanager
def skip_packed_probe(active: bool = True):
    token = _SKIP_PACKED_PROBE.set(active)
    try:
        yield
    finally:
        _SKIP_PACKED_PROBE.reset(token)


def _probe_can_be_skipped(model, batch: Batch) -> bool:
    from finetune.train.attention import ATTENTION_NAME

    config = getattr(unwrap(model), "config", None)
    return batch.is_flat and getattr(config, "_attn_implementation", None) == ATTENTION_NAME


# ----------------------------------------------------------------------------------------------
# Fused / chunked linear cross-entropy through the model's own forward


class _HeadTap:
    """Replaces the output head's forward (instance attribute; weights and state dict untouched).

    Outside ``armed`` it is the original forward. While armed it computes the summed CE of the
    hidden states it receives against the pending targets and returns an empty (.., 0) tensor as
    the "logits", so no vocabulary-sized tensor is made and any logit transform of the model's
    forward runs on nothing.
    """

    def __init__(self, head: torch.nn.Linear, scale: float, softcap: float | None, chunk_size: int) -> None:
        self.head, self.scale, self.softcap, self.chunk_size = head, scale, softcap, chunk_size
        self.original = head.forward
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.result: torch.Tensor | None = None
        head.forward = self.forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            return self.original(hidden)
        index, targets = self.pending
        self.pending = None
        self.result = linear_ce_sum_at(hidden, self.head.weight, self.head.bias, index, targets,
                                       self.chunk_size, self.scale, self.softcap)
        return hidden[..., :0]

    @contextlib.contextmanager
    def armed(self, index: torch.Tensor, targets: torch.Tensor):
        self.pending, self.result = (index, targets), None
        try:
            yield self
        finally:
            self.pending = None


def linear_ce_sum_at(hidden, weight, bias, index, targets, chunk_size: int = CHUNK_SIZE,
                     scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """Summed CE of ``hidden.flatten(0, -2)[index] @ weight.T (+ bias)`` against targets, chunked.

    index / targets come from ``loss_positions`` (computed on the CPU): no host sync here, unlike
    ``losses.chunked_linear_ce_sum``, which selects the trained positions with a boolean mask.
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if index.numel() == 0:
        # Keep the graph connected so backward() works on an all-masked micro-batch.
        return hidden.sum().float() * 0.0 + weight.sum().float() * 0.0
    return _LinearCrossEntropySum.apply(flat, weight, bias, targets, chunk_size, scale, softcap, need_h, need_w)


class ChunkedCausalLMLoss:
    """``loss_sum(model, batch)`` for the engine: the model's forward with the head tapped."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = CHUNK_SIZE, sync_free: bool = True) -> None:
        self.sync_free = sync_free
        base = unwrap(model)
        problem = chunked_ce_problem(model)
        if problem:
            raise RecipeError(f"run.chunked_ce: {problem}")
        head = base.get_output_embeddings()
        scale, softcap = logit_transform_from_config(base.config)
        tap = getattr(head, "_finetune_tap", None)
        if tap is None:
            tap = _HeadTap(head, scale, softcap, chunk_size)
            head._finetune_tap = tap
        self.tap = tap

    def __call__(self, model, batch: Batch) -> torch.Tensor:
        if isinstance(batch, FastBatch):
            index, targets = batch.loss_index, batch.loss_targets
        else:  # eval batches: positions found on the device (one sync; fine outside the step)
            index, targets = loss_positions(batch.labels)
        skip = self.sync_free and _probe_can_be_skipped(model, batch)
        with self.tap.armed(index, targets), skip_packed_probe(skip):
            model(**batch.model_inputs())
            loss = self.tap.result
        if loss is None:
            raise RuntimeError("run.chunked_ce: the model's forward did not call its output head; "
                               "set run.chunked_ce=false for this architecture")
        return loss


def plain_loss_sum(model, batch: Batch) -> torch.Tensor:
    """engine.causal_lm_loss_sum, without transformers' packed-sequence probe on flat batches."""
    from finetune.train.losses import token_ce_sum

    with skip_packed_probe(_probe_can_be_skipped(model, batch)):
        logits = model(**batch.model_inputs()).logits
    return token_ce_sum(logits, batch.labels)


def loss_fn(recipe, model, chunk_size: int = CHUNK_SIZE) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
    """The loss_sum the engine should use for this recipe and model."""
    _install_packed_probe_skip()
    if use_chunked_ce(recipe, model):
        return ChunkedCausalLMLoss(model, chunk_size)
    return plain_loss_sum


# ----------------------------------------------------------------------------------------------
# torch.compile of the decoder layers


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The ModuleList of transformer blocks (``model.layers``, ``transformer.h`` ...), or None."""
    best = None
    for name, module in unwrap(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best):
                best = module
    return best


def compile_layers(model: torch.nn.Module, **compile_kwargs) -> int:
    """Compiles every decoder layer in place; returns how many. Embeddings, the final norm and the
    loss stay eager (the loss has data-dependent chunking; compiling layers gives the fusions
    that matter: norms, rotary, SwiGLU, residual adds)."""
    layers = decoder_layers(model)
    if layers is None:
        raise RecipeError("run.compile: cannot find the model's decoder layers (a ModuleList named layers/h/blocks)")
    _constant_varlen_lookup()
    # Identical layers share one compiled graph; should guards ever tell them apart, dynamo's
    # default of 8 recompiles would leave the later layers silently eager.
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4 * len(layers)))
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


def _constant_varlen_lookup() -> None:
    """finetune.train.attention resolves its kernel through functools.cache + inspect.signature, which
    dynamo cannot trace without a graph break inside every compiled layer; freeze the answer.
    (Belongs in finetune.train.attention: resolve once at import.)"""
    from finetune.train import attention
    if getattr(attention._varlen_kernel, "_finetune_constant", False):
        return
    answer = attention._varlen_kernel()

    def _varlen_kernel():
        return answer

    _varlen_kernel._finetune_constant = True
    attention._varlen_kernel = _varlen_kernel


# ----------------------------------------------------------------------------------------------
# One call for the trainers


@dataclass
class FastPath:
    loss_sum: Callable[[torch.nn.Module, Batch], torch.Tensor]
    count_tokens: Callable[[Batch], int]
    wrap_collate: Callable[[Callable], Callable]
    notes: list[str] = field(default_factory=list)


def setup(recipe, model: torch.nn.Module, *, chunked_ce: bool | str | None = None, compile: bool | None = None,
          sync_free: bool = True, compile_kwargs: dict | None = None) -> FastPath:
    """Applies the recipe's fast-path switches to ``model`` (compiles in place) and returns the
    task pieces. Keyword arguments override the recipe (the benchmark's ablations use them)."""
    notes = []
    if compile is None:
        compile = bool(_run_setting(recipe, "compile", False))
    if compile:
        n = compile_layers(model, **(compile_kwargs or {}))
        notes.append(f"torch.compile: {n} decoder layers")
    if chunked_ce is None:
        use = use_chunked_ce(recipe, model)
    else:
        use = chunked_ce is True or (chunked_ce == "auto" and chunked_ce_problem(model, recipe) is None
                                     and torch.cuda.is_available())
    if sync_free:
        _install_packed_probe_skip()
        loss = ChunkedCausalLMLoss(model) if use else plain_loss_sum
        fast = FastPath(loss, count_tokens, wrap_collate, notes)
    else:
        from finetune.train.engine import causal_lm_loss_sum

        loss = ChunkedCausalLMLoss(model, sync_free=False) if use else causal_lm_loss_sum
        fast = FastPath(loss, lambda b: count_trained_tokens(b.labels), lambda c: c, notes)
    if use:
        notes.append(f"fused linear cross-entropy (chunks of {CHUNK_SIZE} trained tokens; no full fp32 logits)")
    return fast


# ----------------------------------------------------------------------------------------------
# Exactness check (finetune bench --check, tests)


def compare_with_plain(model: torch.nn.Module, samples: list[dict], policy: str = "bf16",
                       compile: bool = False) -> dict:
    """Loss and gradients of the plain path (padded rows, the model's sdpa, full logits) and of the
    fast path (padding-free varlen, fused CE, optionally compiled layers) on the same samples, each
    against an fp32 plain reference. ``model``: fp32 weights, sdpa attention; it is cast to the
    policy's dtype (bf16 | amp: fp32 + bf16 autocast | fp32) and switched to finetune_varlen.
    "Equal within bf16 noise" reads: the fast path's error against the reference is no larger than
    the plain bf16 path's."""
    from finetune.train.attention import enable_packed_attention
    from finetune.train.collate import collate_flat, collate_padded
    from finetune.train.engine import causal_lm_loss_sum

    device = next(model.parameters()).device

    def loss_and_grads(loss_fn, batch, autocast: bool):
        model.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads

    padded = collate_padded(samples, pad_id=0).to(device)
    n = padded.num_trained_tokens
    ref_loss, ref_grads = loss_and_grads(causal_lm_loss_sum, padded, False)
    model.to(torch.bfloat16 if policy == "bf16" else torch.float32)
    plain_loss, plain_grads = loss_and_grads(causal_lm_loss_sum, padded, policy == "amp")
    enable_packed_attention(model)
    fast = setup(None, model, chunked_ce=True, compile=compile, sync_free=True,
                 compile_kwargs={"backend": "eager"} if compile and device.type == "cpu" else None)
    flat = fast.wrap_collate(collate_flat)(samples).to(device)
    fast_loss, fast_grads = loss_and_grads(fast.loss_sum, flat, policy == "amp")

    def rel(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-30))

    return {
        "policy": policy, "compile": compile, "trained_tokens": n,
        "loss_ref_fp32": ref_loss / n, "loss_plain": plain_loss / n, "loss_fast": fast_loss / n,
        "loss_rel_err_plain": abs(plain_loss - ref_loss) / abs(ref_loss),
        "loss_rel_err_fast": abs(fast_loss - ref_loss) / abs(ref_loss),
        "grad_rel_err_plain": rel(plain_grads, ref_grads), "grad_rel_err_fast": rel(fast_grads, ref_grads),
        "grad_rel_diff_fast_vs_plain": rel(fast_grads, plain_grads),
    }
