"""`finetune env`: the launch doctor — versions, devices, and what a strategy needs."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def report(strategy: str | None = None) -> list[str]:
    import torch

    from finetune.models.precision import auto_precision

    lines = [f"python        {platform.python_version()} ({platform.machine()}, {platform.system()})"]
    for pkg in ("finetune", "torch", "transformers", "accelerate", "peft", "trl", "datasets", "bitsandbytes",
                "deepspeed", "liger-kernel"):
        lines.append(f"{pkg:<13} {_version(pkg)}")
    cuda = torch.cuda.is_available()
    lines.append(f"cuda          {torch.version.cuda or 'none'} (available: {cuda})")
    if cuda:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else "?"
        lines.append(f"nccl          {nccl}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}         {p.name}, {p.total_memory / 2**30:.1f} GiB, "
                         f"sm {p.major}.{p.minor}, precision auto: {auto_precision(i)}")
    else:
        lines.append(f"cpu           {os.cpu_count()} cores; multi-process runs use gloo")
    lines.append(f"distributed   {'available' if torch.distributed.is_available() else 'unavailable'}; "
                 f"gloo {torch.distributed.is_gloo_available()}, nccl "
                 f"{torch.distributed.is_nccl_available() if torch.distributed.is_available() else False}")
    for var in ("MASTER_ADDR", "MASTER_PORT", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES"):
        if os.environ.get(var):
            lines.append(f"env           {var}={os.environ[var]}")
    # The verdicts follow finetune.run.launch.check_launch: "ok" where `finetune launch` would start.
    dist = torch.distributed.is_available()
    from finetune.train.deepspeed_support import MIN_VERSION, launch_problem

    deepspeed = launch_problem() is None
    needs = {
        "ddp": ("torch.distributed (gloo on CPU, nccl on GPU); one process per GPU", dist),
        "fsdp": ("torch.distributed (FSDP2's fully_shard and torch.distributed.checkpoint); GPUs or gloo CPU "
                 "processes", dist),
        # DeepSpeed's CPU accelerator runs ZeRO over gloo where there is no GPU.
        "zero2": (f"deepspeed >= {MIN_VERSION} (pip install 'finetune[deepspeed]'); CUDA GPUs or CPU processes "
                  "(gloo)", dist and deepspeed),
        "zero3": (f"deepspeed >= {MIN_VERSION} (pip install 'finetune[deepspeed]'); CUDA GPUs or CPU processes "
                  "(gloo)", dist and deepspeed),
    }
    for name, (need, ok) in needs.items():
        if strategy in (None, name):
            lines.append(f"strategy {name:<5} {'ok' if ok else 'missing'}: needs {need}")
    return lines
