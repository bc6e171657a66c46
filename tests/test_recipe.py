"""Recipe schema, YAML line numbers, overrides and the file-system checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.errors import RecipeError
from finetune.recipe.checks import check_recipe
from finetune.recipe.schema import dump_recipe, load_recipe, recipe_differences, recipe_from_dict, recipe_to_dict
from tests.conftest import ROOT, tiny_pretrain_recipe, write

GOOD = """\
model:
  name: Qwen/Qwen2.5-0.5B-Instruct
data:
  train:
    - path: org/some-dataset
      format: messages
trainer:
  type: sft
optim:
  lr: 1e-4
run:
  output_dir: runs/x
  max_steps: 10
"""


def recipe_file(tmp_path: Path, text: str) -> Path:
    return write(tmp_path / "r.yaml", text)


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file(tmp_path, text), list(overrides))
    return str(e.value)


def test_good_recipe_types_and_defaults(tmp_path):
    r = load_recipe(recipe_file(tmp_path, GOOD))
    assert r.optim.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; the schema types it
    assert r.run.max_steps == 10 and r.run.micro_batch_size == 4 and r.adapter is None


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  lr: 1e-4", "  lr: 1e-4\n  warmup_stpes: 3"))
    assert msg.startswith(f"{tmp_path / 'r.yaml'}:11:")
    assert "optim.warmup_stpes" in msg and "did you mean 'optim.warmup_steps'" in msg


def test_unknown_section_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD + "optimm:\n  lr: 1\n")
    assert "unknown key 'optimm'" in msg and "did you mean 'optim'" in msg


def test_wrong_type_names_key_and_line(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("max_steps: 10", "max_steps: ten"))
    assert ":13:" in msg and "run.max_steps" in msg and "'ten'" in msg


@pytest.mark.parametrize("bad", ["max_steps: 0", "max_steps: -5"])
def test_non_positive_steps_rejected(tmp_path, bad):
    assert "run.max_steps" in error_of(tmp_path, GOOD.replace("max_steps: 10", bad))


def test_zero_batch_rejected(tmp_path):
    msg = error_of(tmp_path, GOOD + "  micro_batch_size: 0\n")
    assert "run.micro_batch_size" in msg and "greater than 0" in msg


def test_bad_enum_value(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("type: sft", "type: kto"))
    assert "trainer.type" in msg and "pretrain" in msg


def test_missing_required_section(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("trainer:\n  type: sft\n", ""))
    assert "missing required key 'trainer'" in msg


def test_model_needs_exactly_one_source(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  name: Qwen/Qwen2.5-0.5B-Instruct", "  dtype: auto"))
    assert "model.init_config" in msg and "r.yaml:1:" in msg


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("  lr: 1e-4", "  lr: [1e-4"))
    assert "YAML syntax error" in msg and "r.yaml:" in msg


def test_empty_and_non_mapping_recipes(tmp_path):
    assert "empty" in error_of(tmp_path, "")
    assert "mapping" in error_of(tmp_path, "- a\n- b\n")


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_are_typed_by_the_schema(tmp_path):
    r = load_recipe(recipe_file(tmp_path, GOOD), ["optim.lr=3e-5", "run.max_steps=20", "run.report_to=[tensorboard]",
                                                  "adapter.r=8", "data.train.0.max_samples=5"])
    assert r.optim.lr == pytest.approx(3e-5) and r.run.max_steps == 20 and r.run.report_to == ["tensorboard"]
    assert r.adapter is not None and r.adapter.r == 8 and r.data.train[0].max_samples == 5


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("optim.lrr=1", "did you mean 'optim.lr'"), ("run.max_steps=abc", "run.max_steps"),
     ("run.max_steps", "expected key=value"), ("run.micro_batch_size=0", "greater than 0"),
     ("data.train.3.path=x", "out of range")],
)
def test_bad_overrides(tmp_path, override, fragment):
    msg = error_of(tmp_path, GOOD, [override])
    assert fragment in msg


def test_override_error_names_the_override(tmp_path):
    assert "override 'run.max_steps=abc'" in error_of(tmp_path, GOOD, ["run.max_steps=abc"])


def test_resolved_recipe_round_trips(tmp_path):
    r = load_recipe(recipe_file(tmp_path, GOOD), ["optim.lr=5e-5"])
    again = load_recipe(write(tmp_path / "resolved.yaml", dump_recipe(r)))
    assert recipe_to_dict(again) == recipe_to_dict(r)


def test_recipe_differences_ignore_schedule_only_keys():
    a = recipe_to_dict(recipe_from_dict(yaml.safe_load(GOOD)))
    b = yaml.safe_load(yaml.safe_dump(a))
    b["run"]["max_steps"] = 99
    b["run"]["log_every"] = 3
    assert recipe_differences(a, b) == []
    b["optim"]["lr"] = 1.0
    assert recipe_differences(a, b) == ["optim.lr"]


def test_check_recipe_missing_data_file(in_tmp):
    data = tiny_pretrain_recipe(in_tmp)
    data["data"]["train"][0]["path"] = "missing.jsonl"
    with pytest.raises(RecipeError, match=r"data.train.0.path: data file 'missing.jsonl' does not exist"):
        check_recipe(recipe_from_dict(data))


def test_check_recipe_bad_model_reference(in_tmp):
    data = tiny_pretrain_recipe(in_tmp)
    data["model"] = {"name": "./no/such/model"}
    with pytest.raises(RecipeError, match="neither an existing local directory nor a Hub id"):
        check_recipe(recipe_from_dict(data))


def test_from_scratch_needs_a_tokenizer(in_tmp):
    data = tiny_pretrain_recipe(in_tmp)
    data["tokenizer"] = {}
    with pytest.raises(RecipeError, match="tokenizer.train"):
        check_recipe(recipe_from_dict(data))


def shipped_recipes(path: Path) -> list:
    """(what, recipe) for a plain recipe, or for every training stage of a pipeline."""
    from finetune.run.pipeline import is_pipeline, load_pipeline

    if not is_pipeline(path):
        return [(path.name, load_recipe(path))]
    _, stages = load_pipeline(path)
    return [(f"{path.name} stage {stage.name}", recipe) for stage, recipe in stages if recipe is not None]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path, monkeypatch):
    from finetune.recipe import checks
    from finetune.run.pipeline import is_pipeline, load_pipeline

    monkeypatch.chdir(ROOT)
    real_check, deferred = checks.check_model_ref, []

    def check_model_ref(name: str, key: str) -> None:
        # A model another recipe (or an earlier stage) writes under runs/ is checked in the test
        # below; every other check (data paths above all) still runs on this recipe.
        if Path(name).parts[:1] == ("runs",):
            deferred.append(name)
        else:
            real_check(name, key)

    monkeypatch.setattr(checks, "check_model_ref", check_model_ref)
    checked = shipped_recipes(path)
    for what, recipe in checked:
        try:
            check_recipe(recipe)
        except RecipeError as e:
            pytest.fail(f"{what}: {e}")
    if is_pipeline(path):  # the pipeline's own eval data, and a stage for every stage but merges
        pipe, stages = load_pipeline(path)
        assert pipe.pipeline.eval is None or Path(pipe.pipeline.eval.data).is_file(), pipe.pipeline.eval
        assert len(checked) == sum(s.merge is None for s in pipe.stages) > 0
        assert all(name.startswith(f"{pipe.pipeline.output_dir}/") for name in deferred), deferred


def test_a_model_written_by_another_run_is_named_when_missing(tmp_path, monkeypatch, capsys):
    from finetune.cli.main import main

    monkeypatch.chdir(tmp_path)  # no runs/ here, whatever has been run in the repository
    assert main(["validate", str(ROOT / "recipes/reward.yaml")]) == 2
    err = capsys.readouterr().err
    assert "model.name: 'runs/quickstart/sft/final'" in err and "written by another run" in err


def test_validate_does_not_import_torch():
    code = ("import sys; from finetune.cli.main import main; rc = main(['validate', 'recipes/quickstart.yaml']); "
            "assert 'torch' not in sys.modules, 'validate imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
