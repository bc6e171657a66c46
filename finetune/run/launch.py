"""Running a recipe in this process: output-dir checks, resume decision, dry-run, trainer call.

`finetune run` runs in-process (pdb works, and it runs unchanged under `accelerate launch -m
finetune` or `torchrun`, where accelerate reads the process group from the environment).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import yaml

from finetune.console import console, info
from finetune.errors import RecipeError
from finetune.recipe.checks import check_recipe
from finetune.recipe.schema import Recipe, dump_recipe, recipe_differences, recipe_to_dict


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_resume(recipe: Recipe) -> Path | None:
    """Which checkpoint to resume from, or None for a fresh run. Refuses to mix two runs."""
    from finetune.train.checkpoint import STATE_FILE, latest_checkpoint, verify_checkpoint

    run = recipe.run
    out = Path(run.output_dir)
    if run.resume not in ("auto", "never"):
        ckpt = Path(run.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise RecipeError(f"run.resume: {ckpt} is not a checkpoint directory (no {STATE_FILE})")
        problem = verify_checkpoint(ckpt)
        if problem:
            raise RecipeError(f"run.resume: {ckpt} is unusable: {problem}")
        return ckpt
    if not out.exists() or run.overwrite:
        return None
    ckpt = latest_checkpoint(out)
    saved = out / "recipe.yaml"
    if ckpt is None:
        if (out / "final").exists():
            raise RecipeError(f"run.output_dir: {out} already holds a finished run (final/) and no checkpoint to "
                              "continue from (run.save_every keeps one); choose another run.output_dir or set "
                              "run.overwrite=true to replace it")
        return None
    if run.resume == "never":
        raise RecipeError(f"run.output_dir: {out} holds checkpoints and run.resume is 'never'; choose another "
                          "run.output_dir or set run.overwrite=true")
    step = json.loads((ckpt / STATE_FILE).read_text()).get("step")
    if saved.is_file():
        old = yaml.safe_load(saved.read_text())
        diffs = recipe_differences(old, recipe_to_dict(recipe))
        if diffs:
            shown = ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
            raise RecipeError(
                f"run.output_dir: {out} holds checkpoints of a different run (differs in {shown}); to start a new "
                f"run from its last state (step {step}) with these values: finetune run {recipe._source} ... "
                f"run.resume={ckpt} run.output_dir={_free_dir(out)}")
        for key in CADENCE_KEYS:
            before, after = old.get("run", {}).get(key), getattr(run, key)
            if before != after:
                info(f"[yellow]note:[/] resuming with run.{key} {before} -> {after}")
    if (out / "final").exists() and run.max_steps is not None and step is not None and step >= run.max_steps:
        raise RecipeError(f"run.output_dir: {out} already finished at step {step} (final/); raise run.max_steps "
                          "to continue training it, or set run.overwrite=true to start over")
    return ckpt


# Keys that change when things happen, not what is trained: a resume with new values says so.
CADENCE_KEYS = ("log_every", "eval_every", "save_every", "keep_last", "eval_batches", "sample_prompts")


def _free_dir(out: Path) -> Path:
    """out-2, out-3, ...: the first sibling that does not exist yet."""
    n = 2
    while out.with_name(f"{out.name}-{n}").exists():
        n += 1
    return out.with_name(f"{out.name}-{n}")


def check_output_dir(path: Path, key: str = "run.output_dir") -> None:
    """The output directory must be a directory this process can write: checked before any weight
    is loaded, so a typo costs a second, not a training run. Leaves nothing behind."""
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{key}: {path} exists and is not a directory")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RecipeError(f"{key}: {path} cannot be created: {ancestor} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-write-check-", dir=ancestor))
    except OSError as e:
        raise RecipeError(f"{key}: {path} is not writable ({e.strerror or e} in {ancestor})") from None


def check_model_positions(recipe: Recipe) -> list[str]:
    """tokenizer.max_length vs the model's positions, from its config alone (skipped when the
    config cannot be read here, e.g. an uncached Hub model offline: loading then says why)."""
    from finetune.errors import UserError
    from finetune.models.loading import check_positions, load_config

    try:
        config = load_config(recipe)
    except UserError:
        return []
    note = check_positions(recipe, config)
    return [note] if note else []


def enable_tf32() -> None:
    """On CUDA, fp32 matmuls (fp32 master weights outside autocast, fp32 runs) on TF32 tensor cores:
    several-fold faster on Ampere and newer at ~1e-3 relative error. The legacy call keeps every
    getter working: torch's per-backend fp32_precision makes get_float32_matmul_precision()
    (read by inductor) raise."""
    import torch

    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")


# Trainers that generate during training, with the strategies under which they do: sampling runs
# on every rank's full copy of the policy, which fsdp/zero3 shard (and fsdp's rank-0-only loading
# leaves uninitialised on the other ranks). Every other trainer runs under every strategy.
STRATEGIES = {"ppo": ("ddp",), "rs_sft": ("ddp", "zero2")}


def active_strategy(recipe: Recipe) -> str:
    """The recipe's strategy, or the one a cluster's own `accelerate launch` set in the environment."""
    if recipe.launch.strategy != "ddp":
        return recipe.launch.strategy
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and stage in ("2", "3"):
        return f"zero{stage}"
    return "ddp"


def check_strategy(recipe: Recipe) -> None:
    """Refuses a trainer + strategy pair that would hang or fail after the weights are loaded."""
    strategy, allowed = active_strategy(recipe), STRATEGIES.get(recipe.trainer.type)
    if recipe.trainer.type == "distill" and recipe.trainer.distill.on_policy_fraction > 0:
        allowed = STRATEGIES["rs_sft"]  # the student samples on every rank, as rs_sft does
    if allowed and strategy not in allowed:
        raise RecipeError(f"launch.strategy: {recipe.trainer.type} runs under {' or '.join(allowed)}; {strategy} "
                          "shards the weights that every process samples from, which this trainer does not gather")


def run_recipe(recipe: Recipe, dry_run: bool = False) -> Path | None:
    from transformers.utils import logging as hf_logging

    from finetune.trainers import get_trainer

    hf_logging.disable_progress_bar()  # our own progress output is the one to read
    for note in check_recipe(recipe) + check_model_positions(recipe):
        info(f"[yellow]note:[/] {note}")
    check_output_dir(Path(recipe.run.output_dir))
    check_strategy(recipe)
    trainer = get_trainer(recipe.trainer.type)
    resume_from = resolve_resume(recipe)
    if dry_run:
        console.print(dump_recipe(recipe), markup=False)
        for line in trainer.plan(recipe).lines(recipe, world_size()):
            console.print(line, markup=False)
        if resume_from is not None:
            console.print(f"resume     from {resume_from}", markup=False)
        return None
    out = Path(recipe.run.output_dir)
    if recipe.run.overwrite and out.exists() and resume_from is None and is_main_process():
        shutil.rmtree(out)
    if resume_from is not None:
        info(f"resuming from {resume_from}")
    from accelerate.utils import set_seed

    set_seed(recipe.run.seed)  # before any weights are initialised: from-scratch runs are reproducible
    enable_tf32()  # here, for every trainer
    final = trainer.train(recipe, resume_from=resume_from, num_processes=world_size())
    if final is not None and Path(final).is_dir() and is_main_process():
        from finetune.run.model_card import write_model_card

        write_model_card(recipe, Path(final))
    info(f"done: {final}")
    return final


def end_process_group() -> None:
    """The process group of `finetune run` under `finetune launch` / torchrun ends with the command,
    not with a trainer's inner engine call (rs_sft rounds, pipeline stages still need it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# `finetune launch`: the same run in N processes (x M nodes) through `accelerate launch`


def wrap_classes(recipe: Recipe) -> list[str] | None:
    """The block classes FSDP wraps one by one: the model's own `_no_split_modules` (e.g.
    LlamaDecoderLayer, GPT2Block, GPTNeoXLayer; Gemma-3's text and vision layers), read from a copy
    built on the meta device, so no weight is loaded or allocated."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune.models.loading import load_config

    try:
        config = load_config(recipe)
        auto = AutoModelForSequenceClassification if recipe.trainer.type == "reward" else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - config unreachable offline: accelerate's default policy then
        return None
    present = {type(m).__name__ for m in model.modules()}
    # Composite models (vision + text) declare their blocks on the sub-models; accelerate refuses
    # a class name that is not in the model, so only classes present are listed.
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    return sorted(names & present) or None


def deepspeed_config(recipe: Recipe) -> dict:
    """The DeepSpeed JSON for zero2/zero3. accelerate leaves the micro batch "auto" and fills it
    only from a DataLoader passed to prepare() (ours are not), so every batch key is explicit; the
    engine accumulates grad_accum micro-batches and clips at the boundary (engine.py hands it both)."""
    from finetune.train.engine import resolve_precision

    precision = resolve_precision(recipe)
    stage = int(recipe.launch.strategy[-1])
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # final/ holds the full weights
    return {
        "train_micro_batch_size_per_gpu": recipe.run.micro_batch_size,
        "gradient_accumulation_steps": recipe.run.grad_accum,
        "gradient_clipping": recipe.optim.max_grad_norm or 0.0,  # 0: no clipping
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def accelerate_config(recipe: Recipe, deepspeed_file: Path | None = None) -> dict:
    """The accelerate config for the recipe's launch section (written next to the run)."""
    la = recipe.launch
    host, _, port = (la.master or "127.0.0.1:29500").rpartition(":")
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": la.nnodes,
        "machine_rank": la.node_rank,
        "num_processes": la.num_processes * la.nnodes,  # accelerate counts processes over all nodes
        "main_process_ip": host or "127.0.0.1",
        "main_process_port": int(port or 29500),
        "rdzv_backend": "static",
        "same_network": True,
        # The engine picks precision from the recipe; the launcher must not impose another.
        "mixed_precision": "no",
        "use_cpu": False,
    }
    if la.strategy == "fsdp":
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "FULL_STATE_DICT" if la.fsdp_state_dict == "full" else "SHARDED_STATE_DICT",
            # Rank 0 alone reads the weights (the others hold empty tensors) and they are
            # broadcast at prepare(): host RAM holds one fp32 copy per node, not one per GPU.
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_sync_module_states": True,  # accelerate launch requires it with the line above
            "fsdp_activation_checkpointing": False,
        }
        layers = wrap_classes(recipe)
        if layers:
            config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = ",".join(layers)
    elif la.strategy in ("zero2", "zero3"):
        config["distributed_type"] = "DEEPSPEED"
        # With a DeepSpeed file accelerate refuses a mixed_precision key (the file's bf16/fp16 decide).
        del config["mixed_precision"]
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file or "deepspeed_config.json"),
            "zero3_init_flag": False,
        }
    return config


def check_launch(recipe: Recipe, gpus_requested: bool) -> None:
    """Everything that can be wrong before a process starts."""
    import importlib.util
    import socket

    import torch

    la = recipe.launch
    check_strategy(recipe)
    if la.nnodes > 1 and not la.master:
        raise RecipeError("launch.master: nnodes > 1 needs the address of node 0 as host:port (--master)")
    if la.node_rank >= la.nnodes:
        raise RecipeError(f"launch.node_rank: {la.node_rank} must be below launch.nnodes ({la.nnodes})")
    if la.master and not re.fullmatch(r"[\w.\-:\[\]]+:\d{1,5}", la.master):
        raise RecipeError(f"launch.master: {la.master!r} is not host:port")
    if la.strategy != "ddp" and (recipe.run.save_every or recipe.run.resume not in ("auto", "never")):
        # Checkpoints hold rank 0's optimizer state, which is complete only when it is replicated.
        raise RecipeError(f"launch.strategy {la.strategy}: resumable checkpoints are written for ddp only in "
                          "this version (optimizer state is sharded); set run.save_every=null or use ddp")
    visible = torch.cuda.device_count()
    if gpus_requested and la.num_processes > visible:
        raise RecipeError(f"--gpus {la.num_processes}: only {visible} CUDA GPU(s) visible on this machine "
                          "(use --num-processes for CPU processes)")
    if la.strategy in ("zero2", "zero3") and importlib.util.find_spec("deepspeed") is None:
        raise RecipeError(f"launch.strategy {la.strategy}: needs DeepSpeed (pip install deepspeed)")
    if la.strategy != "ddp" and visible == 0:
        # accelerate runs CPU process groups as plain multi-CPU data parallel: no sharding there.
        raise RecipeError(f"launch.strategy {la.strategy}: needs CUDA GPUs (accelerate shards only on GPUs); "
                          "use ddp on CPU")
    if la.strategy == "fsdp" and recipe.model.quantize and recipe.adapter is None:
        raise RecipeError("launch.strategy fsdp: a quantized model trains only adapters; add an adapter section")
    if la.node_rank == 0:
        host, _, port = (la.master or "127.0.0.1:29500").rpartition(":")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("" if host not in ("127.0.0.1", "localhost") else host, int(port)))
            except OSError:
                raise RecipeError(f"launch: port {port} is in use on this node; pick another with "
                                  f"--master {host or '127.0.0.1'}:PORT") from None


def launch_processes(recipe_path: str, overrides: list[str], recipe: Recipe, gpus_requested: bool) -> int:
    """Validates in this process, writes the accelerate config, re-executes under accelerate."""
    import subprocess
    import sys

    check_recipe(recipe)
    resolve_resume(recipe)  # a different run in output_dir fails here, before any process starts
    check_launch(recipe, gpus_requested)
    out = Path(recipe.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One file per node: nodes sharing a file system must not overwrite each other's machine_rank.
    suffix = f"-node{recipe.launch.node_rank}" if recipe.launch.nnodes > 1 else ""
    config_path = out / f"accelerate_config{suffix}.yaml"
    ds_path = None
    if recipe.launch.strategy in ("zero2", "zero3"):
        ds_path = out / f"deepspeed_config{suffix}.json"
        ds_path.write_text(json.dumps(deepspeed_config(recipe), indent=2))
    config_path.write_text(yaml.safe_dump(accelerate_config(recipe, ds_path), sort_keys=False))
    la = recipe.launch
    info(f"launching {la.num_processes} process(es) x {la.nnodes} node(s), strategy {la.strategy}; "
         f"accelerate config: {config_path}")
    # Launch settings travel as overrides so every process sees the same resolved recipe.
    launch_overrides = [f"launch.{k}={v}" for k, v in la.model_dump().items() if v is not None]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
           "-m", "finetune", "run", recipe_path, *overrides, *launch_overrides]
    return subprocess.call(cmd)  # an argument list, never a shell string
