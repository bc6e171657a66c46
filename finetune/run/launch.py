"""Running a recipe in this process: output-dir checks, resume decision, dry-run, trainer call.

`finetune run` runs in-process (pdb works, and it runs unchanged under `accelerate launch -m
finetune` or `torchrun`, where accelerate reads the process group from the environment).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml

from finetune.console import console, info
from finetune.errors import RecipeError
from finetune.recipe.checks import check_recipe, output_dir_problem
from finetune.recipe.schema import Recipe, dump_recipe, recipe_differences, recipe_to_dict


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_resume(recipe: Recipe) -> Path | None:
    """Which checkpoint to resume from, or None for a fresh run. Refuses to mix two runs."""
    from finetune.train.checkpoint_files import STATE_FILE, latest_checkpoint, verify_checkpoint

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
    """The output directory must be a directory this process can write (recipe.checks says how)."""
    problem = output_dir_problem(path)
    if problem:
        raise RecipeError(f"{key}: {problem}")


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
        clear_output_dir(out)
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


# The files `finetune launch` wrote into output_dir for the processes it starts (accelerate's config,
# the DeepSpeed JSON every process reads while rank 0 may be clearing the directory): run.overwrite keeps them.
LAUNCH_FILES_ENV = "FINETUNE_LAUNCH_FILES"


def clear_output_dir(out: Path) -> None:
    """run.overwrite: output_dir emptied, but for the files this process's launcher wrote there."""
    keep = {Path(p).resolve() for p in os.environ.get(LAUNCH_FILES_ENV, "").split(os.pathsep) if p}
    if not keep:
        shutil.rmtree(out)
        return
    for entry in out.iterdir():
        if entry.resolve() in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def end_process_group() -> None:
    """The process group of `finetune run` under `finetune launch` / torchrun ends with the command,
    not with a trainer's inner engine call (rs_sft rounds, pipeline stages still need it).

    Every rank first waits for the others (no rank tears its connections down while a peer still
    talks to it), then the run's objects are collected while the interpreter is alive: FSDP2's
    module state keeps the group's last work objects in reference cycles, and gloo freeing them
    during interpreter shutdown aborted a finished run's rank 1 (SIGABRT, "terminate called without
    an active exception": tests/test_fsdp.py under make test, 2026-11-30: twice after a finished run,
    once after a preemption, whose exit code 75 a scheduler reads, so cmd_run ends the group then too)."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


# ----------------------------------------------------------------------------------------------
# `finetune launch`: the same run in N processes (x M nodes) through `accelerate launch`


def deepspeed_config(recipe: Recipe) -> dict:
    """The DeepSpeed JSON for zero2/zero3 (finetune/train/deepspeed_support.py says what it holds and why)."""
    from finetune.train.deepspeed_support import config
    from finetune.train.engine import resolve_precision

    return config(recipe, recipe.launch.num_processes * recipe.launch.nnodes, resolve_precision(recipe))


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
    # fsdp has no section here: the engine applies FSDP2 itself on GPUs and CPUs alike
    # (finetune/train/sharding.py); accelerate only starts the processes, as for ddp.
    if la.strategy in ("zero2", "zero3"):
        config["distributed_type"] = "DEEPSPEED"
        # With a DeepSpeed file accelerate refuses a mixed_precision key (the file's bf16/fp16 decide).
        del config["mixed_precision"]
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(deepspeed_file or "deepspeed_config.json"),
            "zero3_init_flag": False,
            # Multi-node: torchrun on every node (`finetune launch` runs on each), not pdsh over ssh.
            "deepspeed_multinode_launcher": "standard",
        }
    return config


def check_launch(recipe: Recipe, gpus_requested: bool) -> None:
    """Everything that can be wrong before a process starts."""
    import socket

    la = recipe.launch
    check_strategy(recipe)
    if la.nnodes > 1 and not la.master:
        raise RecipeError("launch.master: nnodes > 1 needs the address of node 0 as host:port (--master)")
    if la.node_rank >= la.nnodes:
        raise RecipeError(f"launch.node_rank: {la.node_rank} must be below launch.nnodes ({la.nnodes})")
    if la.master and not re.fullmatch(r"[\w.\-:\[\]]+:\d{1,5}", la.master):
        raise RecipeError(f"launch.master: {la.master!r} is not host:port")
    if gpus_requested:
        import torch  # only here: the launching process never trains, and torch costs it ~1.3 s of CPU

        visible = torch.cuda.device_count()
        if la.num_processes > visible:
            raise RecipeError(f"--gpus {la.num_processes}: only {visible} CUDA GPU(s) visible on this machine "
                              "(use --num-processes for CPU processes)")
    if la.strategy in ("zero2", "zero3"):
        from finetune.train.deepspeed_support import launch_problem

        problem = launch_problem()
        if problem:
            raise RecipeError(f"launch.strategy {la.strategy}: {problem}")
        # No CUDA check: DeepSpeed runs on CPU processes too, over gloo (deepspeed_support.start_kwargs).
    if la.strategy == "fsdp" and recipe.model.quantize:
        raise RecipeError("launch.strategy fsdp: a 4/8-bit (model.quantize) base is not sharded by FSDP2 here; "
                          "use ddp (each process holds the quantized base)")
    if la.node_rank == 0:
        host, _, port = (la.master or "127.0.0.1:29500").rpartition(":")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("" if host not in ("127.0.0.1", "localhost") else host, int(port)))
            except OSError:
                raise RecipeError(f"launch: port {port} is in use on this node; pick another with "
                                  f"--master {host or '127.0.0.1'}:PORT") from None


def check_resume_world(ckpt: Path | None, processes: int) -> None:
    """The engine refuses to resume with another process count (the data position is per rank);
    the launcher says so before starting any process."""
    from finetune.train.checkpoint_files import STATE_FILE

    if ckpt is None:
        return
    saved = json.loads((ckpt / STATE_FILE).read_text()).get("num_processes", processes)
    if saved != processes:
        raise RecipeError(f"run.resume: {ckpt} was written by {saved} process(es); resume it with {saved} "
                          f"(--num-processes x --nnodes), not {processes}")


def launch_processes(recipe_path: str, overrides: list[str], recipe: Recipe, gpus_requested: bool) -> int:
    """Validates in this process, writes the accelerate config, re-executes under accelerate."""
    import subprocess
    import sys

    check_recipe(recipe)
    resume = resolve_resume(recipe)  # a different run in output_dir fails here, before any process starts
    check_launch(recipe, gpus_requested)
    check_resume_world(resume, recipe.launch.num_processes * recipe.launch.nnodes)
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
    written = os.pathsep.join(str(p.resolve()) for p in (config_path, ds_path) if p is not None)
    # An argument list, never a shell string.
    return subprocess.call(cmd, env={**os.environ, LAUNCH_FILES_ENV: written})
