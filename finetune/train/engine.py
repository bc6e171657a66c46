"""The supervised training loop, written once for pretrain, SFT, reward and the SFT phase of rs_sft.

Per optimizer step:
    take grad_accum micro-batches -> count trained tokens over all of them on all ranks ->
    for each: forward -> loss_sum / global_tokens -> backward (no DDP sync until the last) ->
    clip -> optimizer step -> scheduler step -> log -> maybe eval / save.

The loss is normalised by the number of trained tokens in the whole optimizer step, across
accumulation and ranks. A mean of micro-batch means would weight a short sequence's tokens
more than a long one's (torchtune #2307, the HF grad-accum bug); with this normalisation,
batch 1 x accumulation 4 gives exactly the gradients of batch 4 x accumulation 1.

Data order is a pure function of (seed, epoch): the stream of micro-batches is indexed, so a
resumed run continues at exactly the micro-batch where the checkpoint was taken.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.console import info
from finetune.errors import DataError
from finetune.models.precision import mixed_precision
from finetune.recipe.schema import Recipe, write_recipe
from finetune.train import checkpoint, deepspeed_support, sharding
from finetune.train.collate import Batch
from finetune.train.guards import NumericGuard, Preempted, StopSignal, TrainingStopped, oom_message
from finetune.train.losses import count_trained_tokens, token_ce_sum
from finetune.train.metrics import MetricsLogger


def causal_lm_loss_sum(model, batch: Batch) -> torch.Tensor:
    """Summed next-token cross-entropy over the batch's trained tokens."""
    logits = model(**batch.model_inputs()).logits
    return token_ce_sum(logits, batch.labels)


@dataclass
class SupervisedTask:
    """What a trainer hands the engine: model, data units and the loss."""

    model: torch.nn.Module
    tokenizer: Any
    train_units: Sequence[dict]
    collate: Callable[[list[dict]], Batch]
    eval_units: Sequence[dict] | None = None
    # The summed loss, or (summed loss, {name: summed statistic}): the engine logs each statistic as
    # a mean per counted unit over the log window (eval: `eval_<name>`), e.g. DPO's rewards per pair.
    loss_sum: Callable[[torch.nn.Module, Batch], torch.Tensor | tuple[torch.Tensor, dict]] = causal_lm_loss_sum
    count_tokens: Callable[[Batch], int] = lambda batch: count_trained_tokens(batch.labels)
    # Extra held-out metrics (e.g. exact-match) computed by the trainer on the unwrapped model.
    evaluate_extra: Callable[[torch.nn.Module], dict] | None = None
    # Eval units are single samples even when training units are packed rows.
    eval_collate: Callable[[list[dict]], Batch] | None = None
    notes: list[str] = field(default_factory=list)
    # Called once with the prepared model and the accelerator, before a checkpoint is restored, so it
    # sees the starting weights (sharded or not) in the run's autocast: e.g. DPO's reference log-probs.
    on_prepared: Callable[[torch.nn.Module, Any], None] | None = None


class MicroBatchStream:
    """Deterministic, resumable micro-batch order for one rank.

    Epoch e is a permutation of the units seeded by (seed, e), cut into global batches of
    micro_batch_size x world units; rank r takes its contiguous slice. A tail shorter than a
    global batch is dropped each epoch, so every rank sees the same number of micro-batches.
    """

    def __init__(self, n_units: int, micro_batch_size: int, world: int, rank: int, seed: int,
                 shuffle: bool) -> None:
        self.n, self.mbs, self.world, self.rank = n_units, micro_batch_size, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.per_epoch = n_units // (micro_batch_size * world)
        self._perm: tuple[int, list[int]] | None = None

    def indices(self, index: int) -> list[int]:
        epoch, j = divmod(index, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(self.n))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                order = torch.randperm(self.n, generator=g).tolist()
            self._perm = (epoch, order)
        start = (j * self.world + self.rank) * self.mbs
        return self._perm[1][start:start + self.mbs]


def total_steps(recipe: Recipe, stream: MicroBatchStream) -> int:
    if recipe.run.max_steps:
        return recipe.run.max_steps
    return max(1, math.ceil(recipe.run.epochs * stream.per_epoch / recipe.run.grad_accum))


def resolve_precision(recipe: Recipe) -> str:
    """accelerate's mixed_precision value; `auto` is bf16 on a GPU that computes it natively, fp16
    (with accelerate's loss scaler) on older GPUs, else fp32 (finetune.models.precision)."""
    return mixed_precision(recipe.run.precision)


_MOVE_FIRST = ("NO", "MULTI_GPU", "MULTI_CPU")  # DistributedType values where prepare() only moves the model


def build_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = recipe.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on biases and norm weights (1-D tensors), as in GPT-2/LLaMA recipes.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": o.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if o.name == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=o.betas, eps=o.eps)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=fused or None)


def build_scheduler(recipe: Recipe, optimizer, steps: int):
    from finetune.train.schedules import lr_schedule

    o = recipe.optim
    warmup = o.warmup_steps or math.ceil(o.warmup_ratio * steps)
    # transformers' "constant" ignores warmup; a recipe asking for both means a warmup, then constant.
    name = "constant_with_warmup" if o.scheduler == "constant" and warmup else o.scheduler
    return lr_schedule(name, optimizer, warmup, steps)


def use_recipe_lr(lr: float, optimizer, scheduler) -> None:
    """A checkpoint restores the schedule's base learning rate; a run started from it (run.resume)
    with another optim.lr trains with the new one. The schedule's shape is the recipe's (its total
    may have grown), so the current lr is recomputed from it; unchanged recipes get the same value."""
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def start_process():
    """The process group and this rank's device, set before any weight or CUDA tensor exists.

    Every trainer calls it first: a model, a bitsandbytes probe or a CUDA context created before
    accelerate sets the device lands on GPU 0, once per rank. cpu=True where there is no CUDA, as
    in train(): else accelerate ignores a torchrun/accelerate process group of CPU processes and
    each process, its own rank 0, samples every prompt and writes every file (PartialState is a
    singleton: the first construction decides for the whole process). Under DeepSpeed without CUDA,
    cpu=False with gloo (deepspeed_support.start_kwargs).
    """
    from accelerate import PartialState

    return PartialState(**deepspeed_support.start_kwargs())


def train(recipe: Recipe, task: SupervisedTask, accelerator=None, resume_from: Path | None = None) -> Path:
    """Runs the supervised loop to the end; returns <output_dir>/final."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    out = Path(recipe.run.output_dir)
    run = recipe.run
    if accelerator is None:
        start_process()  # the process group first (DeepSpeed on the CPU needs its backend named)
    with sharding.accelerate_without_fsdp():
        accelerator = accelerator or Accelerator(
            # cpu=True on a machine without CUDA: otherwise accelerate ignores a torchrun/accelerate
            # process group there and every process trains alone (gloo is the CPU backend); False
            # under DeepSpeed, which accelerate turns off under cpu=True.
            **deepspeed_support.accelerator_kwargs(recipe),
            mixed_precision=resolve_precision(recipe), log_with=run.report_to or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
    set_seed(run.seed)
    # FSDP2 over the processes (sharding.py); one process has nothing to shard over.
    fsdp = sharding.fsdp_requested(recipe) and accelerator.num_processes > 1
    kind = "fsdp" if fsdp else accelerator.distributed_type.value.lower()
    info(f"device     {accelerator.num_processes} x {accelerator.device.type} "
         f"({kind}, precision {deepspeed_support.precision_label(accelerator)})", accelerator)
    stream = MicroBatchStream(len(task.train_units), run.micro_batch_size, accelerator.num_processes,
                              accelerator.process_index, run.seed, recipe.data.shuffle)
    if stream.per_epoch == 0:
        raise DataError(f"data.train: {len(task.train_units)} training units is fewer than one global batch "
                        f"(run.micro_batch_size {run.micro_batch_size} x {accelerator.num_processes} processes)")
    steps = total_steps(recipe, stream)
    if fsdp:
        sharding.shard(task.model, accelerator, recipe)  # each rank's slice moves to its device
    elif not getattr(task.model, "hf_device_map", None) and accelerator.distributed_type.value in _MOVE_FIRST:
        # accelerate would move it in prepare(); moved first, build_optimizer sees CUDA parameters
        # and builds the fused AdamW (one kernel per step instead of a foreach chain).
        task.model.to(accelerator.device)
    optimizer = build_optimizer(recipe, task.model)
    scheduler = build_scheduler(recipe, optimizer, steps)
    if fsdp:
        model, optimizer = sharding.prepare(accelerator, task.model, optimizer)
    else:
        model, optimizer = accelerator.prepare(task.model, optimizer)
    if task.on_prepared is not None:
        task.on_prepared(model, accelerator)

    state = {"step": 0, "micro_index": 0, "tokens_seen": 0, "num_processes": accelerator.num_processes}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(recipe, out / "recipe.yaml")
        checkpoint.remove_partial_checkpoints(out)
    if resume_from is not None:
        # Refuses another process count (or a checkpoint of another strategy) before reading weights.
        state = checkpoint.load_checkpoint(accelerator, resume_from, model, optimizer, scheduler)
        use_recipe_lr(recipe.optim.lr, optimizer, scheduler)
        info(f"resumed from {resume_from} at step {state['step']}", accelerator)
    if run.report_to:
        accelerator.init_trackers(out.name, config=_flat_config(recipe))

    logger = MetricsLogger(out, steps, state["step"], accelerator)
    if run.eval_at_start and task.eval_units and state["step"] == 0:
        logger.log({"step": 0, **evaluate(recipe, task, model, accelerator)})
    model.train()
    window = _Window(accelerator.device)
    loop = _Loop(recipe, task, model, optimizer, scheduler, accelerator, stream, logger, window, steps)
    state.setdefault("skipped_steps", 0)
    stop = StopSignal()
    try:
        while state["step"] < steps:
            loop.step(state)
            if stop.should_stop(accelerator):
                _preempt(loop, state, stop.name or "a signal to another process")  # all ranks stop
        final = save_final(accelerator, model, task.tokenizer, out)
    except BaseException:
        release_accelerator()
        raise
    finally:
        stop.close()
        logger.close()
    if run.sample_prompts:
        # Every rank generates (a sharded model's forward is collective); rank 0 prints.
        print_samples(accelerator.unwrap_model(model), task.tokenizer, run.sample_prompts,
                      run.sample_max_new_tokens)
    # Not accelerator.end_training(): it also ends the process group, which a caller may still
    # need (rs_sft samples and evaluates across ranks after each round's SFT); run_recipe ends it.
    for tracker in accelerator.trackers:
        tracker.finish()
    release_accelerator()
    return final


@dataclass
class _Loop:
    """One optimizer step at a time: the loop order of DESIGN.md, with the guards around it."""

    recipe: Recipe
    task: SupervisedTask
    model: Any
    optimizer: Any
    scheduler: Any
    accelerator: Any
    stream: MicroBatchStream
    logger: MetricsLogger
    window: _Window
    steps: int

    def __post_init__(self) -> None:
        self.guard = NumericGuard(self.recipe.run.max_skipped_steps, resolve_precision(self.recipe) == "fp16")

    def step(self, state: dict) -> None:
        run, acc = self.recipe.run, self.accelerator
        first = state["micro_index"]
        micro = [_next_batch(self.task, self.stream, state, acc.device) for _ in range(run.grad_accum)]
        try:
            accumulate_gradients(acc, self.model, self.task, micro, self.window, state["step"] + 1)
            # Clipping also yields the global gradient norm the numeric guard reads (inf = no clip);
            # under DeepSpeed the engine clipped already and this is its norm, a float.
            # Under FSDP2 the norm is a DTensor; sharding.plain makes it the full value.
            grad_norm = sharding.plain(acc.clip_grad_norm_(self.model.parameters(),
                                                           self.recipe.optim.max_grad_norm or float("inf")))
        except torch.cuda.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
            longest = max(int(b.input_ids.shape[-1]) for b in micro)
            raise TrainingStopped(oom_message(state["step"] + 1, run.micro_batch_size, longest, self.recipe)) from None
        if not self.guard.step_is_finite(grad_norm):
            # The batch is consumed but the weights, optimizer and schedule do not move.
            self.optimizer.zero_grad(set_to_none=True)
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            info(f"step {state['step'] + 1}: non-finite loss/gradient, step skipped "
                 f"({self.guard.consecutive} in a row, {state['skipped_steps']} in total)", acc)
            ids = [i for k in range(first, state["micro_index"]) for i in self.stream.indices(k)]
            self.guard.check_limit(state["step"] + 1, ids, self.scheduler.get_last_lr()[0], run.precision)
            return
        self.optimizer.step()
        # Under DeepSpeed the engine stepped inside backward (optimizer.step is a no-op); this
        # schedule then sets the lr of the optimizer the engine wraps, once per optimizer step:
        # accelerate hands the engine only DeepSpeed's own schedule classes, and its
        # AcceleratedScheduler would step num_processes times per step.
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        self.window.grad_norm = grad_norm
        _after_step(self.recipe, self.task, self.model, self.optimizer, self.scheduler, acc, state,
                    self.steps, self.stream, self.logger, self.window)

    def save(self, state: dict) -> Path:
        return checkpoint.save_checkpoint(self.accelerator, Path(self.recipe.run.output_dir), state["step"],
                                          self.model, self.optimizer, self.scheduler, dict(state),
                                          self.recipe.run.keep_last, self.task.tokenizer)


def _preempt(loop: _Loop, state: dict, signal_name: str) -> None:
    """Checkpoint at this step boundary (unless one was just written) and stop with exit 75."""
    out = Path(loop.recipe.run.output_dir)
    path = checkpoint.checkpoint_dir(out) / f"step-{state['step']}"
    if not path.is_dir():
        path = loop.save(state)
    info(f"{signal_name}: stopped after step {state['step']}; checkpoint {path}; "
         "rerun the same command to resume", loop.accelerator)
    raise Preempted(f"preempted by {signal_name} after step {state['step']}: checkpoint {path} written; "
                    "rerun the same command to resume")


def release_accelerator() -> None:
    """Forget this run's mixed-precision and accumulation settings (accelerate keeps them in a
    process-wide singleton), so the next stage in the same process may choose its own. The
    distributed process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def accumulate_gradients(accelerator, model, task: SupervisedTask, micro: list[Batch], window=None,
                         step: int = 0) -> int:
    """Forward/backward over one optimizer step's micro-batches; returns the global trained tokens.

    Each micro-batch contributes loss_sum / (trained tokens of the whole step on all ranks), so
    the accumulated gradient is the token mean over the step whatever the split into micro-batches.
    """
    step_tokens = _global_sum(accelerator, sum(task.count_tokens(b) for b in micro))
    if step_tokens == 0:
        raise DataError(f"step {step}: no trained tokens in the whole optimizer step")
    deepspeed = engine_steps_in_backward(accelerator)
    # Under DeepSpeed the engine accumulates, clips and steps inside the backward of the step's
    # last micro-batch (accelerate reads sync_gradients as that boundary). The scaling, term by term:
    # accelerator.backward divides by its gradient_accumulation_steps for every other backend (1
    # there: nothing), but under DeepSpeed hands the loss unchanged to DeepSpeedEngine.backward,
    # which divides it by the JSON's gradient_accumulation_steps (= run.grad_accum) unless
    # scale_wrt_gas=False; DeepSpeed 0.19's output-gradient hooks divide again only for a plain
    # loss.backward(), not inside engine.backward. ZeRO's gradient reduce(-scatter) then averages
    # over the data-parallel ranks, as DDP's all-reduce does. Our loss_sum x num_processes /
    # step_tokens is already the step's token mean once averaged over ranks and summed over
    # micro-batches, so scale_wrt_gas=False: dividing by grad_accum as well would shrink every
    # gradient grad_accum-fold (tests/test_deepspeed.py compares the engine's gradient norm and the
    # weights with one plain process; with scale_wrt_gas=True the norm came out halved at grad_accum 2).
    kwargs = {"scale_wrt_gas": False} if deepspeed else {}
    try:
        for i, batch in enumerate(micro):
            # DDP all-reduces gradients only on the last micro-batch of the step; FSDP2 has no
            # no_sync (nullcontext) and reduce-scatters every micro-batch (sharding.py says why).
            sync = i == len(micro) - 1
            if deepspeed:
                accelerator.gradient_state._set_sync_gradients(sync)
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                loss_sum, stats = split_loss(task.loss_sum(model, batch))
                # DDP averages over ranks; x num_processes turns that into the global token mean.
                accelerator.backward(loss_sum * accelerator.num_processes / step_tokens, **kwargs)
            if window is not None:
                window.add(loss_sum.detach(), task.count_tokens(batch), batch.num_tokens, stats)
    finally:
        if deepspeed:
            accelerator.gradient_state._set_sync_gradients(True)
    return step_tokens


def split_loss(out) -> tuple[torch.Tensor, dict]:
    """A task's loss_sum output as (summed loss, summed statistics)."""
    return out if isinstance(out, tuple) else (out, {})


def add_stats(total: dict, stats: dict) -> None:
    for name, value in stats.items():
        total[name] = total.get(name, 0.0) + value.detach().double()


def mean_stats(accelerator, total: dict, count: int, prefix: str = "") -> dict:
    """Summed statistics of all ranks divided by the units counted (the same names on every rank)."""
    return {prefix + name: float(_global_sum(accelerator, total[name])) / max(count, 1) for name in sorted(total)}


def engine_steps_in_backward(accelerator) -> bool:
    """DeepSpeed: the optimizer step, clipping and zero_grad happen in accelerator.backward (the
    optimizer's step/zero_grad are no-ops there; DeepSpeed skips a non-finite step itself)."""
    return deepspeed_support.is_engine(accelerator)


def _next_batch(task: SupervisedTask, stream: MicroBatchStream, state: dict, device) -> Batch:
    units = [task.train_units[i] for i in stream.indices(state["micro_index"])]
    state["micro_index"] += 1
    return task.collate(units).to(device)


class _Window:
    """Loss and token sums since the last log line, kept on device to avoid a sync per step."""

    def __init__(self, device) -> None:
        self.device = device
        self.reset()
        self.grad_norm = None

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.trained = 0
        self.tokens = 0
        self.stats: dict = {}
        self.start = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, trained: int, tokens: int, stats: dict | None = None) -> None:
        self.loss += loss_sum.double()
        self.trained += trained
        self.tokens += tokens
        add_stats(self.stats, stats or {})


def _after_step(recipe, task, model, optimizer, scheduler, accelerator, state, steps, stream,
                logger, window) -> None:
    run = recipe.run
    step = state["step"]
    last = step == steps
    if step % run.log_every == 0 or last:
        loss = _global_sum(accelerator, window.loss)
        trained = _global_sum(accelerator, window.trained)
        tokens = _global_sum(accelerator, window.tokens)
        state["tokens_seen"] += tokens
        elapsed = time.perf_counter() - window.start
        record = {
            "step": step, "epoch": round(state["micro_index"] / stream.per_epoch, 4),
            "loss": float(loss) / max(trained, 1), "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(window.grad_norm) if window.grad_norm is not None else None,
            "tokens": state["tokens_seen"], "tokens_per_s": tokens / max(elapsed, 1e-9),
            **mean_stats(accelerator, window.stats, trained),
        }
        if state.get("skipped_steps"):
            record["skipped_steps"] = state["skipped_steps"]
        logger.log(record)
        window.reset()
    else:
        logger.advance(step)
    if task.eval_units and ((run.eval_every and step % run.eval_every == 0) or last):
        logger.log({"step": step, **evaluate(recipe, task, model, accelerator)})
        model.train()
    # The last step is saved too (as transformers' Trainer does): a finished run keeps a resumable
    # state, so raising run.max_steps / run.epochs continues from where it ended.
    if run.save_every and (step % run.save_every == 0 or last):
        checkpoint.save_checkpoint(accelerator, Path(run.output_dir), step, model, optimizer, scheduler,
                                   dict(state), run.keep_last, task.tokenizer)


@torch.no_grad()
def evaluate(recipe: Recipe, task: SupervisedTask, model, accelerator) -> dict:
    """Held-out token-mean loss (and perplexity) over all ranks, plus the trainer's extras."""
    model.eval()
    units = list(task.eval_units)
    collate = task.eval_collate or task.collate
    loss = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    trained, stats = 0, {}
    for idx in eval_batches(len(units), recipe.run.micro_batch_size, accelerator.num_processes,
                            accelerator.process_index, recipe.run.eval_batches):
        if not idx:
            # This rank's share of the last batch is empty: a forward on a stand-in row, its loss
            # dropped, keeps every rank's forward passes (FSDP's/ZeRO-3's all-gathers) paired.
            _, dropped = split_loss(task.loss_sum(model, collate(units[:1]).to(accelerator.device)))
            add_stats(stats, {name: value * 0 for name, value in dropped.items()})  # same names on every rank
            continue
        batch = collate([units[i] for i in idx]).to(accelerator.device)
        loss_sum, batch_stats = split_loss(task.loss_sum(model, batch))
        loss += loss_sum.double()
        add_stats(stats, batch_stats)
        trained += task.count_tokens(batch)
    loss = float(_global_sum(accelerator, loss))
    trained = _global_sum(accelerator, trained)
    total = loss / max(trained, 1)
    result = {"eval_loss": total, "eval_ppl": math.exp(min(total, 50.0)),
              **mean_stats(accelerator, stats, trained, "eval_")}
    if task.evaluate_extra is not None:
        result.update(task.evaluate_extra(accelerator.unwrap_model(model)))
    return result


def eval_batches(n_units: int, micro_batch_size: int, world: int, rank: int,
                 limit: int | None = None) -> list[list[int]]:
    """This rank's eval batches (unit indices), the same count on every rank.

    Global batch b holds units [b*m*w, (b+1)*m*w) with m = micro_batch_size, w = world; rank r
    takes its r-th slice of m units. In the last global batch a slice may be short or empty ([]):
    the caller still runs one forward for it, so sharded models' collectives never wait on a rank
    that has finished. `limit` caps the batches per rank (run.eval_batches).
    """
    per_global = micro_batch_size * world
    count = math.ceil(n_units / per_global)
    if limit:
        count = min(count, limit)
    start = lambda b: min(n_units, b * per_global + rank * micro_batch_size)  # noqa: E731
    return [list(range(start(b), min(n_units, start(b) + micro_batch_size))) for b in range(count)]


def save_final(accelerator, model, tokenizer, out: Path) -> Path:
    """final/: save_pretrained output (full model or adapter) and the tokenizer, atomically."""
    final, tmp = out / "final", out / ".tmp-final"
    # FSDP2: the full weights gathered to rank 0 (a collective), so final/ is never sharded.
    state_dict = sharding.full_state_dict(model) if sharding.is_sharded(model) else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def print_samples(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy completions of raw-text prompts, printed to show what the model learned."""
    model.eval()
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
        gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        outputs.append(text)
        info(f"  {prompt!r} -> {text!r}")
    return outputs


def _global_sum(accelerator, value):
    """Sum of a Python number or tensor over ranks (returned as the same kind)."""
    if accelerator.num_processes == 1:
        return value
    is_tensor = torch.is_tensor(value)
    t = value if is_tensor else torch.tensor(value, device=accelerator.device, dtype=torch.float64)
    t = accelerator.reduce(t.clone(), reduction="sum")
    return t if is_tensor else int(t.item()) if isinstance(value, int) else float(t.item())


def _flat_config(recipe: Recipe) -> dict:
    from finetune.recipe.schema import recipe_to_dict

    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", recipe_to_dict(recipe))
    return flat
