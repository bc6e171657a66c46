"""The trainer registry: `trainer.type` in the recipe -> the module that trains it.

Each trainer module exposes train(recipe) and plan(recipe). The mapping below is the whole way
from a recipe to its trainer; each entry is a plain import inside a function so that
`finetune validate` (which only needs the names) never imports torch.
"""

from __future__ import annotations

from types import ModuleType


def _pretrain() -> ModuleType:
    from finetune.trainers import pretrain

    return pretrain


def _sft() -> ModuleType:
    from finetune.trainers import sft

    return sft


def _reward() -> ModuleType:
    from finetune.trainers import reward

    return reward


def _rs_sft() -> ModuleType:
    from finetune.trainers import rs_sft

    return rs_sft


def _ppo() -> ModuleType:
    from finetune.trainers import ppo

    return ppo


def _dpo() -> ModuleType:
    from finetune.trainers import dpo

    return dpo


def _distill() -> ModuleType:
    from finetune.trainers import distill

    return distill


REGISTRY = {
    "pretrain": _pretrain,
    "sft": _sft,
    "reward": _reward,
    "rs_sft": _rs_sft,
    "ppo": _ppo,
    "dpo": _dpo,
    "distill": _distill,
}


def get_trainer(name: str) -> ModuleType:
    from finetune.errors import RecipeError

    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise RecipeError(f"trainer.type: {name!r} is not available yet in this version (available: {known})")
    return REGISTRY[name]()
