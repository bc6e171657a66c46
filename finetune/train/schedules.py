"""Learning-rate schedules: transformers' own formulas for the common names, built without
importing transformers.optimization. That module imports trainer_utils, which imports peft, which
imports bitsandbytes, whose torch.compile decorators import torch._dynamo: ~1.5 s of CPU at every
process start (each rank of `finetune launch`) for a full-weight run that needs none of them.
Other names go to transformers' get_scheduler. tests/test_engine.py compares every formula here
with transformers' step by step."""

from __future__ import annotations

import math
from functools import partial

from torch.optim.lr_scheduler import LambdaLR


def constant(_=None):
    return 1  # transformers' _get_constant_lambda: an int, so lr = base * 1 exactly


def constant_with_warmup(step: int, *, num_warmup_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1.0, num_warmup_steps))
    return 1.0


def linear(step: int, *, num_warmup_steps: int, num_training_steps: int) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    return max(0.0, float(num_training_steps - step) / float(max(1, num_training_steps - num_warmup_steps)))


def cosine(step: int, *, num_warmup_steps: int, num_training_steps: int, num_cycles: float = 0.5,
           min_lr_rate: float = 0.0) -> float:
    if step < num_warmup_steps:
        return float(step) / float(max(1, num_warmup_steps))
    progress = float(step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0, factor * (1 - min_lr_rate) + min_lr_rate)


def lr_schedule(name: str, optimizer, warmup: int, steps: int):
    """transformers.get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)."""
    if name == "constant":
        return LambdaLR(optimizer, constant)
    if name == "constant_with_warmup":
        return LambdaLR(optimizer, partial(constant_with_warmup, num_warmup_steps=warmup))
    if name == "linear":
        return LambdaLR(optimizer, partial(linear, num_warmup_steps=warmup, num_training_steps=steps))
    if name == "cosine":
        return LambdaLR(optimizer, partial(cosine, num_warmup_steps=warmup, num_training_steps=steps, num_cycles=0.5))
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
