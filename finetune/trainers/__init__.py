"""The trainer registry: `trainer.type` in the recipe -> module exposing train(recipe) and plan(recipe).

Modules are imported lazily so `finetune validate` never imports torch.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "pretrain": "finetune.trainers.pretrain",
    "sft": "finetune.trainers.sft",
    "reward": "finetune.trainers.reward",
    "rs_sft": "finetune.trainers.rs_sft",
    "ppo": "finetune.trainers.ppo",
}


def get_trainer(name: str):
    from finetune.errors import RecipeError

    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise RecipeError(f"trainer.type: {name!r} is not available yet in this version (available: {known})")
    return importlib.import_module(REGISTRY[name])
