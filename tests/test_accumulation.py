"""Recipe-level accumulation through the real engine: run.grad_accum 4 x micro_batch_size 2 trains
exactly as grad_accum 1 x micro_batch_size 8 (same sequences per step, token mean over the step)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import tiny_sft_recipe
from tests.tiny_cache import shared_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def train(tmp, model_dir, name: str, micro_batch_size: int, grad_accum: int):
    data = tiny_sft_recipe(tmp, model_dir, max_steps=2, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                           output_dir=str(tmp / name))
    del data["data"]["eval"]  # no held-out generation: only the steps are compared
    data["data"]["train"][0]["max_samples"] = 16  # the two steps' sequences
    # Adam with eps far above the gradients steps ~lr*g/eps: a wrongly scaled or weighted gradient
    # shows in the weights (with eps 1e-8 Adam's first steps are ~lr*sign(g), blind to scale).
    data["optim"].update(lr=0.5, eps=10.0, max_grad_norm=None, scheduler="constant")
    run_recipe(recipe_from_dict(data))
    records = [json.loads(x) for x in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(tmp / name / "final" / "model.safetensors"), [r for r in records if "loss" in r]


def test_grad_accum_4_x_2_equals_grad_accum_1_x_8(in_tmp, tiny_model_dir):
    start = load_file(tiny_model_dir / "model.safetensors")
    one, one_log = train(in_tmp, tiny_model_dir, "one", micro_batch_size=8, grad_accum=1)
    acc, acc_log = train(in_tmp, tiny_model_dir, "acc", micro_batch_size=2, grad_accum=4)
    assert [r["step"] for r in acc_log] == [r["step"] for r in one_log] == [1, 2]
    assert [r["loss"] for r in acc_log] == pytest.approx([r["loss"] for r in one_log], rel=1e-5)
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # the steps moved the weights far beyond the tolerance below
    for k in one:
        torch.testing.assert_close(acc[k], one[k], atol=1e-6, rtol=1e-5)
