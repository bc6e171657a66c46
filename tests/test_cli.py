"""The CLI contract: exit 2 with one clear line (no traceback) for every user mistake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from finetune.cli.main import main
from tests.conftest import ROOT, tiny_pretrain_recipe, write


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def recipe_path(tmp, data: dict) -> str:
    return str(write(tmp / "recipe.yaml", yaml.safe_dump(data, sort_keys=False)))


def assert_user_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1 and fragment in lines[0], err


def test_validate_ok(capsys, in_tmp):
    rc, out, _ = run_cli(capsys, "validate", recipe_path(in_tmp, tiny_pretrain_recipe(in_tmp)))
    assert rc == 0 and "ok (pretrain" in out


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["run"].update(max_steps=0), "run.max_steps"),
        (lambda d: d["run"].update(micro_batch_size=-1), "run.micro_batch_size"),
        (lambda d: d["optim"].update(lrr=1), "did you mean 'optim.lr'"),
        (lambda d: d["run"].update(max_steps="many"), "run.max_steps"),
        (lambda d: d["data"]["train"][0].update(path="nope/missing.txt"), "does not exist"),
        (lambda d: d.update(model={"name": "/definitely/not/here"}), "neither an existing local directory"),
    ],
)
def test_bad_recipes_exit_2_on_validate_and_run(capsys, in_tmp, mutate, fragment):
    data = tiny_pretrain_recipe(in_tmp)
    mutate(data)
    path = recipe_path(in_tmp, data)
    for command in ("validate", "run"):
        rc, _, err = run_cli(capsys, command, path)
        assert_user_error(rc, err, fragment)
    assert not (in_tmp / "out").exists()  # nothing written


def test_missing_recipe_file(capsys, in_tmp):
    rc, _, err = run_cli(capsys, "run", "nope.yaml")
    assert_user_error(rc, err, "recipe file not found")


def test_yaml_syntax_error(capsys, in_tmp):
    path = write(in_tmp / "bad.yaml", "model:\n  name: [unclosed\n")
    rc, _, err = run_cli(capsys, "validate", str(path))
    assert_user_error(rc, err, "bad.yaml:")


def test_bad_override(capsys, in_tmp):
    rc, _, err = run_cli(capsys, "run", recipe_path(in_tmp, tiny_pretrain_recipe(in_tmp)), "optim.lr=fast")
    assert_user_error(rc, err, "override 'optim.lr=fast'")


def test_empty_dataset(capsys, in_tmp):
    data = tiny_pretrain_recipe(in_tmp)
    write(in_tmp / "corpus.txt", "\n\n\n")
    rc, _, err = run_cli(capsys, "run", recipe_path(in_tmp, data))
    assert_user_error(rc, err, "holds no rows")
    assert not (in_tmp / "out").exists()


def test_jsonl_line_that_is_not_json(capsys, in_tmp):
    data = tiny_pretrain_recipe(in_tmp)
    write(in_tmp / "docs.jsonl", json.dumps({"text": "1 + 1 = 2"}) + "\n{oops\n")
    data["data"]["train"][0]["path"] = str(in_tmp / "docs.jsonl")
    rc, _, err = run_cli(capsys, "run", recipe_path(in_tmp, data))
    assert_user_error(rc, err, "docs.jsonl:2: not valid JSON")


def test_missing_column_names_expected_and_present(capsys, in_tmp):
    data = tiny_pretrain_recipe(in_tmp)
    write(in_tmp / "docs.jsonl", json.dumps({"body": "1 + 1 = 2"}) + "\n")
    data["data"]["train"][0]["path"] = str(in_tmp / "docs.jsonl")
    rc, _, err = run_cli(capsys, "run", recipe_path(in_tmp, data))
    assert_user_error(rc, err, "docs.jsonl:1: missing column 'text'")
    assert "present: body" in err


def test_dry_run_prints_plan_and_writes_nothing(capsys, in_tmp):
    rc, _, err = run_cli(capsys, "run", recipe_path(in_tmp, tiny_pretrain_recipe(in_tmp)), "--dry-run",
                         "run.grad_accum=2")
    assert rc == 0
    assert "params" in err and "trainable" in err and "blocks/step = 4 micro x 2 accum" in err
    assert "grad_accum: 2" in err  # the resolved recipe, overrides applied
    assert not (in_tmp / "out").exists()


def test_console_script_usage_error_exit_2():
    proc = subprocess.run([sys.executable, "-m", "finetune", "frobnicate"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
