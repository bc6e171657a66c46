"""DeepSpeed ZeRO-2 / ZeRO-3 through accelerate: the config, the process start and the checkpoint files.

`finetune launch --strategy zero2|zero3` writes `deepspeed_config.json` (config() below) and an
accelerate config naming it; accelerate then sets ACCELERATE_USE_DEEPSPEED in every process and
accelerator.prepare(model, optimizer) returns a DeepSpeedEngine and a wrapper whose step() and
zero_grad() are no-ops. The loop (engine.py) stays the same with three differences, each decided here:

- accumulation: accelerate.backward hands the loss to DeepSpeedEngine.backward, which would divide
  it by gradient_accumulation_steps; our loss is already the step's token mean, so the engine gets
  scale_wrt_gas=False (engine.accumulate_gradients), and the step's last micro-batch is marked as
  the accumulation boundary, where the engine reduces, clips (gradient_clipping) and steps.
- optimizer and schedule: built in code (engine.build_optimizer / build_scheduler), so the JSON
  names neither (accelerate refuses an optimizer or scheduler in both places, and DummyOptim /
  DummyScheduler would only offer DeepSpeed's own AdamW and WarmupLR/WarmupDecayLR, not the
  recipe's cosine/linear/constant schedules nor adamw_8bit). accelerate passes the torch optimizer
  to deepspeed.initialize (zero_allow_untested_optimizer); ZeRO keeps the optimizer's param_group
  dicts, so the recipe's LambdaLR, stepped by the loop once per optimizer step, sets the lr the
  engine uses.
- checkpoints: every rank writes its ZeRO shard through the engine's save_checkpoint into the same
  checkpoints/.tmp-step-N/ (a shared file system across nodes), rank 0 lists all of them in the
  manifest after a barrier (checkpoint.save_checkpoint); resume loads them back with the engine's
  load_checkpoint. final/ and the checkpoints' model/ hold the engine's 16-bit weights (bf16/fp16
  runs; ZeRO-3 gathers them: stage3_gather_16bit_weights_on_model_save); the fp32 master weights
  stay in the optimizer shards, which DeepSpeed's zero_to_fp32.py beside them consolidates
  (`python zero_to_fp32.py . OUT --tag deepspeed` inside checkpoints/step-N).

DeepSpeed also runs on the CPU (its CPU accelerator, gloo between processes): start_kwargs() then
keeps accelerate from treating the processes as plain multi-CPU data parallel, which would ignore
DeepSpeed. tests/test_deepspeed.py runs ZeRO-2 and ZeRO-3 that way where deepspeed is installed
(`make test` does not install it: they skip there).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# checkpoints/step-N/<ENGINE_TAG>/: the engine's files (ZeRO-2: rank 0's mp_rank_00_model_states.pt;
# ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank; both: zero_pp_rank_<r>_mp_rank_00_optim_states.pt
# per rank).
ENGINE_TAG = "deepspeed"
STRATEGIES = ("zero2", "zero3")
# deepspeed 0.18.x keeps only the last micro-batch's gradients under ZeRO-2 when accelerate marks the
# accumulation boundary (accelerate#3877; measured here: 0.18.0's gradient norm ~0.54x the plain run's,
# 0.19.0 and 0.19.8 equal to it). pyproject's `deepspeed` extra pins the same range.
MIN_VERSION = "0.19"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def launch_problem() -> str | None:
    """Why zero2/zero3 cannot start here (None: they can): deepspeed missing or too old."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    install = "pip install 'finetune[deepspeed]'"
    if not available():
        return f"needs DeepSpeed ({install})"
    try:
        found = version("deepspeed")
    except PackageNotFoundError:  # importable but not installed as a distribution: a source checkout
        return None
    if Version(found) < Version(MIN_VERSION):
        return (f"deepspeed {found} is older than {MIN_VERSION}: under ZeRO-2 it drops all but the last "
                f"micro-batch's gradients with accumulation ({install})")
    return None


def requested() -> bool:
    """This process was started by `accelerate launch` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def start_kwargs() -> dict:
    """accelerate's PartialState / Accelerator `cpu` (and process-group backend) for this process.

    cpu=True where there is no CUDA makes accelerate use a torchrun process group of CPU processes
    (else each would train alone); but accelerate turns DeepSpeed off under cpu=True, so a DeepSpeed
    process without CUDA asks for cpu=False with gloo: DeepSpeed's CPU accelerator then runs the engine.
    """
    cuda = torch.cuda.is_available()
    if requested() and not cuda:
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": not cuda}


def accelerator_kwargs(recipe) -> dict:
    """The Accelerator's `cpu`, and under DeepSpeed the JSON's accumulation: accelerate otherwise
    warns of a mismatch and takes the JSON's value (its backward never divides by it under DeepSpeed)."""
    kwargs: dict = {"cpu": start_kwargs()["cpu"]}
    if requested():
        kwargs["gradient_accumulation_steps"] = recipe.run.grad_accum
    return kwargs


def precision_label(accelerator) -> str:
    """What the run computes in: accelerate's mixed_precision, or under DeepSpeed (where accelerate
    says "no") the JSON's 16-bit weights."""
    if not is_engine(accelerator):
        return accelerator.mixed_precision
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    half = [name for name in ("bf16", "fp16") if str(ds.get(name, {}).get("enabled", False)).lower() == "true"]
    return f"{half[0]} weights, fp32 master copy" if half else "fp32"


def is_engine(accelerator) -> bool:
    """accelerate prepared a DeepSpeedEngine: the optimizer step, clipping and zero_grad happen in
    accelerator.backward of the step's last micro-batch (the optimizer's step/zero_grad are no-ops)."""
    return getattr(getattr(accelerator, "distributed_type", None), "value", "") == "DEEPSPEED"


def config(recipe, world_size: int, precision: str) -> dict:
    """The DeepSpeed JSON of a zero2/zero3 recipe; every value the engine knows is stated, none "auto".

    accelerate fills "auto" micro batch sizes only from a DataLoader passed to prepare() (ours are
    not) and would fill an "auto" gradient_clipping with 1.0 whatever optim.max_grad_norm says.
    `precision` is accelerate's mixed_precision value (bf16 | fp16 | no): DeepSpeed then keeps the
    weights in that 16-bit dtype with fp32 masters in the optimizer, and accelerate requires the
    file, not its own mixed_precision key, to say it.
    """
    run = recipe.run
    stage = int(recipe.launch.strategy[-1])
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ holds the full weights
    return {
        "train_micro_batch_size_per_gpu": run.micro_batch_size,
        "gradient_accumulation_steps": run.grad_accum,
        # DeepSpeed checks micro x accumulation x data-parallel processes against this.
        "train_batch_size": run.micro_batch_size * run.grad_accum * world_size,
        "gradient_clipping": recipe.optim.max_grad_norm or 0.0,  # 0: no clipping
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        # No "optimizer" / "scheduler": the engine builds both (module docstring).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def save_engine_state(model, directory: Path) -> None:
    """Every rank: the engine's checkpoint (this rank's ZeRO optimizer shard, rank 0's module
    states) into directory/ENGINE_TAG; no `latest` file (the manifest marks what is complete)."""
    model.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)


def load_engine_state(model, directory: Path) -> None:
    """Every rank: weights and this rank's optimizer shard back from directory/ENGINE_TAG. The LR
    schedule is the loop's (scheduler.pt), not the engine's."""
    if not (directory / ENGINE_TAG).is_dir():
        from finetune.errors import RecipeError

        raise RecipeError(f"run.resume: {directory} holds no DeepSpeed state ({ENGINE_TAG}/): it was written by "
                          "a run without zero2/zero3; resume it with the strategy it was written with")
    path, _ = model.load_checkpoint(str(directory), tag=ENGINE_TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory / ENGINE_TAG}")
