"""Continuing a run: a finished run keeps its last state; more steps continue from it, cadence changes
resume with a note, other changes are refused with the command that starts a new run from it."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from finetune.cli.main import main
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import tiny_pretrain_recipe, write


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def recipe_data(tmp, out: str, steps: int) -> dict:
    data = tiny_pretrain_recipe(tmp, max_steps=steps, save_every=3)
    data["optim"].update(scheduler="constant")  # the schedule does not depend on the total: 4 + 2 == 6
    data["run"]["output_dir"] = str(tmp / out)
    return data


def test_raising_max_steps_continues_from_the_end_and_equals_one_longer_run(in_tmp, capsys):
    run_recipe(recipe_from_dict(recipe_data(in_tmp, "long", 6)))
    run_recipe(recipe_from_dict(recipe_data(in_tmp, "grown", 4)))
    assert (in_tmp / "grown" / "checkpoints" / "step-4").is_dir()  # the last state, beside step-3
    capsys.readouterr()
    run_recipe(recipe_from_dict(recipe_data(in_tmp, "grown", 6)))
    assert f"resuming from {in_tmp / 'grown' / 'checkpoints' / 'step-4'}" in capsys.readouterr().err
    steps = [r["step"] for r in records(in_tmp / "grown") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # nothing redone
    a, b = (load_file(in_tmp / d / "final" / "model.safetensors") for d in ("long", "grown"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_a_finished_run_rerun_unchanged_says_it_is_done(in_tmp, capsys):
    run_recipe(recipe_from_dict(recipe_data(in_tmp, "out", 3)))
    path = write(in_tmp / "r.yaml", yaml.safe_dump(recipe_data(in_tmp, "out", 3)))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    assert "already finished at step 3 (final/); raise run.max_steps" in capsys.readouterr().err


def test_cadence_changes_resume_with_a_note(in_tmp, capsys):
    run_recipe(recipe_from_dict(recipe_data(in_tmp, "out", 3)))
    data = recipe_data(in_tmp, "out", 5)
    data["run"]["log_every"] = 2
    capsys.readouterr()
    run_recipe(recipe_from_dict(data))
    err = capsys.readouterr().err
    assert "resuming with run.log_every 1 -> 2" in err
    assert [r["step"] for r in records(in_tmp / "out") if "loss" in r] == [1, 2, 3, 4, 5]  # 4: every 2nd now


def test_other_changes_are_refused_with_the_command_that_continues_with_them(in_tmp, capsys):
    run_recipe(recipe_from_dict(recipe_data(in_tmp, "out", 3)))
    changed = recipe_data(in_tmp, "out", 5)
    changed["optim"]["lr"] = 1e-3
    path = write(in_tmp / "r.yaml", yaml.safe_dump(changed))
    capsys.readouterr()
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    ckpt, new = in_tmp / "out" / "checkpoints" / "step-3", in_tmp / "out-2"
    assert "differs in optim.lr" in err and "\n" not in err
    assert err.endswith(f"finetune run {path} ... run.resume={ckpt} run.output_dir={new}"), err
    # The suggested command works, and trains with the new learning rate from the old state.
    assert main(["run", str(path), f"run.resume={ckpt}", f"run.output_dir={new}"]) == 0
    lrs = [r["lr"] for r in records(new) if "loss" in r]
    assert lrs and all(lr == pytest.approx(1e-3) for lr in lrs), lrs
    assert [r["step"] for r in records(new) if "loss" in r] == [4, 5]
