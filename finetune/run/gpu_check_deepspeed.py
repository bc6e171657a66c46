"""`make gpu-check`'s DeepSpeed lines: a tiny `finetune launch --strategy zero2|zero3` that saves,
is cut short, resumes from its ZeRO checkpoint and must end with the uninterrupted run's weights.

On the GPU: one process per visible GPU (at most 2), bf16 (DeepSpeed's bf16 weights with fp32
masters), nccl. SKIP without deepspeed >= 0.19 (`pip install 'finetune[deepspeed]'`). In --cpu mode
only when asked for by name (`--cpu --only deepspeed`: two gloo processes, fp32, ~3 min on two
cores); tests/test_deepspeed.py covers that path otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch

CHECK = "deepspeed save + resume"


def check(ctx, convs: Path, model_dir, asked: bool) -> list[tuple[str, str, str, str]]:
    """(check, setup, PASS|FAIL|SKIP, numbers) per strategy; model_dir(ctx, role) builds the model."""
    from finetune.train import deepspeed_support
    from finetune.train.bench import SHAPES

    problem = deepspeed_support.launch_problem()
    if problem:
        return [(CHECK, "zero2, zero3", "SKIP", problem)]
    if ctx.cpu and not asked:
        return [(CHECK, "zero2, zero3", "SKIP", "--cpu: run it with --only deepspeed (tests/test_deepspeed.py "
                 "runs ZeRO on CPU processes)")]
    tiny = dataclasses.replace(ctx, shapes={"ds-tiny": dict(SHAPES["tiny"])})
    model = model_dir(tiny, "ds-tiny")
    procs = 2 if ctx.cpu else max(1, min(2, torch.cuda.device_count()))
    return [save_and_resume(ctx, convs, model, strategy, procs) for strategy in ("zero2", "zero3")]


def save_and_resume(ctx, convs: Path, model: Path, strategy: str, procs: int) -> tuple[str, str, str, str]:
    out = ctx.work / f"ds-{strategy}"
    precision = "fp32" if ctx.cpu else "bf16"
    setup = f"{strategy}, {procs} x {'cpu' if ctx.cpu else 'gpu'}, {precision}, micro 2 x accum 2"
    recipe = ctx.work / f"ds-{strategy}.yaml"
    shutil.rmtree(out, ignore_errors=True)
    recipe.write_text(json.dumps({
        "model": {"name": str(model)},
        "tokenizer": {"chat_template": "chatml", "max_length": ctx.max_length},
        "data": {"train": [{"path": str(convs), "format": "messages"}], "cache": False},
        "trainer": {"type": "sft", "exact_match_samples": 0},
        "optim": {"lr": 1e-2},  # large steps: a resume that lost the Adam moments shows in the weights
        "run": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 2, "grad_accum": 2, "save_every": 2,
                "precision": precision, "log_every": 1},
    }))
    first = _launch(recipe, strategy, procs, ctx.cpu)
    if first.returncode:
        return CHECK, setup, "FAIL", f"first launch exit {first.returncode}: {_last_error(first.stderr)}"
    from safetensors.torch import load_file

    from finetune.train.checkpoint import verify_checkpoint

    step2 = out / "checkpoints" / "step-2"
    shards = sorted((step2 / "deepspeed").glob("*_optim_states.pt"))
    manifest = verify_checkpoint(step2) or "ok"
    uninterrupted = load_file(out / "final" / "model.safetensors")
    shutil.rmtree(out / "final")  # as if killed after the step-2 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-4")
    second = _launch(recipe, strategy, procs, ctx.cpu)
    if second.returncode or "resumed from" not in second.stderr:
        return CHECK, setup, "FAIL", f"resume exit {second.returncode}: {_last_error(second.stderr)}"
    resumed = load_file(out / "final" / "model.safetensors")
    # bf16 weights: a reordered GPU reduction may flip the last bit of a few (rtol 1.6e-2 is 2 bf16 ulps)
    rtol, atol = (1e-6, 1e-6) if ctx.cpu else (1.6e-2, 1e-4)
    same = resumed.keys() == uninterrupted.keys() and all(
        torch.allclose(resumed[k].float(), uninterrupted[k].float(), rtol=rtol, atol=atol) for k in resumed)
    diff = max((resumed[k].float() - uninterrupted[k].float()).abs().max().item() for k in resumed
               if k in uninterrupted)
    ok = same and len(shards) == procs and manifest == "ok"
    numbers = (f"step-2: {len(shards)} ZeRO optimizer shard(s), manifest {manifest}; resumed final/ vs uninterrupted: "
               f"max |dw| {diff:.2g} over {len(resumed)} tensors")
    return CHECK, setup, "PASS" if ok else "FAIL", numbers


def _launch(recipe: Path, strategy: str, procs: int, cpu: bool) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flag = "--num-processes" if cpu else "--gpus"
    return subprocess.run([sys.executable, "-m", "finetune", "launch", str(recipe), flag, str(procs), "--strategy",
                           strategy, "--master", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300)


def _last_error(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if "Error" in x or "failed" in x]
    return (lines[-1] if lines else (stderr.strip().splitlines() or ["no output"])[-1])[:300]
