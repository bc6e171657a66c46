"""End to end on the shipped recipes (slow): the quickstart pretrains, SFT then raises exact-match."""

from __future__ import annotations

import json

import pytest

from finetune.launch import run_recipe
from finetune.recipe import load_recipe
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # the recipes use repo-relative data paths
    out = tmp_path_factory.mktemp("quickstart")
    recipe = load_recipe(ROOT / "recipes/quickstart.yaml", [f"run.output_dir={out}"])
    run_recipe(recipe)
    return out


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_quickstart_learns_the_language(quickstart_run, capsys):
    evals = [r for r in metrics(quickstart_run) if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 400
    assert evals[-1]["eval_loss"] < 0.3 * evals[0]["eval_loss"]
    assert (quickstart_run / "final" / "model.safetensors").is_file()


def test_sft_raises_exact_match_over_the_pretrained_model(quickstart_run, tmp_path):
    recipe = load_recipe(ROOT / "recipes/sft_full.yaml",
                         [f"model.name={quickstart_run / 'final'}", f"run.output_dir={tmp_path / 'sft'}"])
    run_recipe(recipe)
    evals = [r for r in metrics(tmp_path / "sft") if "eval_exact_match" in r]
    before, after = evals[0]["eval_exact_match"], evals[-1]["eval_exact_match"]
    assert evals[0]["step"] == 0
    assert after >= before + 0.25, (before, after)
