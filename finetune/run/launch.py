"""Running a recipe in this process: output-dir checks, resume decision, dry-run, trainer call.

`finetune run` runs in-process (pdb works, and it runs unchanged under `accelerate launch -m
finetune` or `torchrun`, where accelerate reads the process group from the environment).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import yaml

from finetune.console import console, info
from finetune.errors import RecipeError
from finetune.recipe.schema import Recipe, check_recipe, dump_recipe, recipe_differences, recipe_to_dict


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
            raise RecipeError(f"run.output_dir: {out} already holds a finished run (final/); choose another "
                              "run.output_dir or set run.overwrite=true to replace it")
        return None
    if run.resume == "never":
        raise RecipeError(f"run.output_dir: {out} holds checkpoints and run.resume is 'never'; choose another "
                          "run.output_dir or set run.overwrite=true")
    if saved.is_file():
        diffs = recipe_differences(yaml.safe_load(saved.read_text()), recipe_to_dict(recipe))
        if diffs:
            shown = ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
            raise RecipeError(f"run.output_dir: {out} holds checkpoints of a different run (differs in {shown}); "
                              "resuming needs the same recipe: choose another run.output_dir")
    return ckpt


def run_recipe(recipe: Recipe, dry_run: bool = False) -> Path | None:
    from transformers.utils import logging as hf_logging

    from finetune.trainers import get_trainer

    hf_logging.disable_progress_bar()  # our own progress output is the one to read
    for note in check_recipe(recipe):
        info(f"[yellow]note:[/] {note}")
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
    final = trainer.train(recipe, resume_from=resume_from, num_processes=world_size())
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


def decoder_layer_class(recipe: Recipe) -> str | None:
    """The transformer block class FSDP wraps one by one (e.g. LlamaDecoderLayer)."""
    from finetune.models.loading import load_config

    try:
        config = load_config(recipe)
    except Exception:  # noqa: BLE001 - config unreachable offline: accelerate's default policy then
        return None
    arch = (config.architectures or [f"{config.model_type.capitalize()}ForCausalLM"])[0]
    return arch.replace("ForCausalLM", "DecoderLayer")


def accelerate_config(recipe: Recipe) -> dict:
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
            "fsdp_cpu_ram_efficient_loading": False,
            "fsdp_activation_checkpointing": False,
        }
        layer = decoder_layer_class(recipe)
        if layer:
            config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = layer
    elif la.strategy in ("zero2", "zero3"):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": int(la.strategy[-1]),
            "gradient_accumulation_steps": 1,  # the engine accumulates itself
            "gradient_clipping": recipe.optim.max_grad_norm or 0.0,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,
            "zero3_save_16bit_model": True,
        }
    return config


def check_launch(recipe: Recipe, gpus_requested: bool) -> None:
    """Everything that can be wrong before a process starts."""
    import importlib.util
    import socket

    import torch

    la = recipe.launch
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
    config_path.write_text(yaml.safe_dump(accelerate_config(recipe), sort_keys=False))
    la = recipe.launch
    info(f"launching {la.num_processes} process(es) x {la.nnodes} node(s), strategy {la.strategy}; "
         f"accelerate config: {config_path}")
    # Launch settings travel as overrides so every process sees the same resolved recipe.
    launch_overrides = [f"launch.{k}={v}" for k, v in la.model_dump().items() if v is not None]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path),
           "-m", "finetune", "run", recipe_path, *overrides, *launch_overrides]
    return subprocess.call(cmd)  # an argument list, never a shell string
