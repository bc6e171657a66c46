"""Pipeline recipes: stage references, validation before running, skip and resume on rerun."""

from __future__ import annotations

import json

import pytest
import yaml

from finetune.cli.main import main
from finetune.errors import RecipeError
from finetune.run.pipeline import load_pipeline, run_pipeline
from tests.conftest import tiny_pretrain_recipe, write


def stage_recipes(tmp) -> None:
    pre = tiny_pretrain_recipe(tmp, max_steps=3)
    write(tmp / "pre.yaml", yaml.safe_dump(pre))
    sft = {"model": {"name": "placeholder"}, "tokenizer": {"chat_template": "chatml", "max_length": 64},
           "data": {"train": [{"path": str(tmp / "chat.jsonl"), "format": "messages"}]},
           "adapter": {"r": 4, "alpha": 8}, "trainer": {"type": "sft", "exact_match_samples": 0},
           "optim": {"lr": 1e-2}, "run": {"output_dir": "placeholder", "max_steps": 2, "micro_batch_size": 2}}
    write(tmp / "sft.yaml", yaml.safe_dump(sft))
    rows = [{"messages": [{"role": "user", "content": f"{a} + 1?"}, {"role": "assistant", "content": f"{a + 1}"}]}
            for a in range(6)]
    write(tmp / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write(tmp / "prompts.jsonl", "".join(json.dumps({"prompt": f"{a} + 1?", "answer": str(a + 1)}) + "\n"
                                         for a in range(3)))


def pipeline(tmp, stages: list[dict], eval_: bool = False) -> str:
    cfg = {"output_dir": str(tmp / "story")}
    if eval_:
        cfg["eval"] = {"data": str(tmp / "prompts.jsonl"), "max_new_tokens": 4}
    return str(write(tmp / "pipe.yaml", yaml.safe_dump({"pipeline": cfg, "stages": stages})))


STAGES = [
    {"name": "pretrain", "recipe": "pre.yaml"},
    {"name": "sft", "recipe": "sft.yaml", "overrides": {"model.name": "stage:pretrain"}},
    {"name": "merged", "merge": "stage:sft"},
]


def test_stages_run_in_order_then_are_skipped(in_tmp, capsys):
    stage_recipes(in_tmp)
    path = pipeline(in_tmp, STAGES, eval_=True)
    root = run_pipeline(path)
    assert (root / "pretrain" / "final" / "model.safetensors").is_file()
    assert (root / "sft" / "final" / "adapter_config.json").is_file()
    assert (root / "merged" / "config.json").is_file()
    sft_recipe = yaml.safe_load((root / "sft" / "recipe.yaml").read_text())
    assert sft_recipe["model"]["name"] == str(root / "pretrain" / "final")
    results = json.loads((root / "pipeline.json").read_text())
    assert [r["stage"] for r in results] == ["pretrain", "sft", "merged"]
    assert [r["model"] for r in results] == [str(root / "pretrain/final"), str(root / "sft/final"),
                                             str(root / "merged")]
    # merged == adapter: the same greedy answers, hence the same accuracy
    assert results[1]["accuracy"] == results[2]["accuracy"]
    assert_merged_is_the_adapter(root, [json.loads(x)["prompt"] for x in (in_tmp / "prompts.jsonl").open()])
    capsys.readouterr()
    before = (root / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", path]) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 3 and "held-out accuracy" in err
    assert (root / "pretrain" / "final" / "model.safetensors").stat().st_mtime_ns == before
    assert (root / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_merged_is_the_adapter(root, prompts: list[str]) -> None:
    """The merged stage answers as the sft adapter on its base does, and that adapter has moved the
    pretrained model: the accuracies above are all 0.0 on so short a run, so they cannot show it."""
    import torch

    from finetune.infer.inference import Settings, encode, generate, load_for_inference

    lms = {name: load_for_inference(str(root / path))
           for name, path in (("pretrain", "pretrain/final"), ("sft", "sft/final"), ("merged", "merged"))}
    assert lms["sft"].ref.kind == "adapter" and lms["merged"].ref.kind == "model"
    greedy = {name: [c.ids for c in generate(lm, prompts, Settings(max_new_tokens=8))] for name, lm in lms.items()}
    assert greedy["merged"] == greedy["sft"]
    with torch.no_grad():
        ids = torch.tensor([encode(lms["sft"].tokenizer, prompts[0], raw=False)])
        logits = {name: lm.model(input_ids=ids).logits for name, lm in lms.items()}
    moved = (logits["sft"] - logits["pretrain"]).abs().max()
    assert (logits["merged"] - logits["sft"]).abs().max() < 1e-3 * moved, moved


def test_overwrite_reruns_a_stage_and_everything_after_it(in_tmp, capsys):
    stage_recipes(in_tmp)
    stages = [dict(s) for s in STAGES]
    root = run_pipeline(pipeline(in_tmp, stages))
    stamp = lambda p: p.stat().st_mtime_ns  # noqa: E731
    pre, merged = stamp(root / "pretrain/final/model.safetensors"), stamp(root / "merged/model.safetensors")
    stages[1]["overrides"] = {**stages[1]["overrides"], "run.overwrite": True}
    capsys.readouterr()
    run_pipeline(pipeline(in_tmp, stages))
    err = capsys.readouterr().err
    assert "stage 1/3 pretrain: finished earlier" in err and "stage 2/3 sft: sft" in err
    assert stamp(root / "pretrain/final/model.safetensors") == pre
    assert stamp(root / "merged/model.safetensors") != merged  # its input changed: merged again


def test_rerun_resumes_the_unfinished_stage(in_tmp, capsys):
    stage_recipes(in_tmp)
    stages = [dict(s) for s in STAGES[:2]]
    stages[1]["overrides"] = {"model.name": "stage:pretrain", "run.save_every": 1}
    path = pipeline(in_tmp, stages)
    root = run_pipeline(path)
    (root / "sft" / "final").rename(in_tmp / "gone")  # as if the sft stage had been killed
    capsys.readouterr()
    run_pipeline(path)
    err = capsys.readouterr().err
    assert "stage 1/2 pretrain: finished earlier" in err and "resuming from" in err
    assert (root / "sft" / "final" / "adapter_config.json").is_file()


@pytest.mark.parametrize(("stages", "fragment"), [
    ([{"name": "a", "recipe": "pre.yaml", "overrides": {"model.name": "stage:b"}},
      {"name": "b", "recipe": "pre.yaml"}], "does not come before"),
    ([{"name": "a", "merge": "stage:a"}], "does not come before"),
    ([{"name": "a", "recipe": "pre.yaml"}, {"name": "a", "recipe": "pre.yaml"}], "duplicate stage name"),
    ([{"name": "a", "recipe": "pre.yaml", "merge": "stage:x"}], "either `recipe`"),
    ([{"name": "a", "recipe": "pre.yaml", "overrides": {"optim.lrr": 1}}], "did you mean 'optim.lr'"),
    ([{"name": "a", "recipe": "missing.yaml"}], "recipe file not found"),
])
def test_bad_pipelines_fail_before_running(in_tmp, capsys, stages, fragment):
    stage_recipes(in_tmp)
    path = pipeline(in_tmp, stages)
    with pytest.raises(RecipeError, match=fragment):
        load_pipeline(path)
    assert main(["validate", path]) == 2 and fragment in capsys.readouterr().err
    assert not (in_tmp / "story").exists()


def test_overrides_reach_the_pipeline_one_stage_or_every_stage(in_tmp):
    stage_recipes(in_tmp)
    path = pipeline(in_tmp, STAGES)
    pipe, planned = load_pipeline(path, [f"pipeline.output_dir={in_tmp / 'other'}", "stages.sft.run.max_steps=1",
                                         "run.seed=7"])
    recipes = {stage.name: recipe for stage, recipe in planned if recipe is not None}
    assert pipe.pipeline.output_dir == str(in_tmp / "other")
    assert recipes["sft"].run.output_dir == str(in_tmp / "other" / "sft")
    assert recipes["sft"].run.max_steps == 1 and recipes["pretrain"].run.max_steps == 3
    assert recipes["sft"].run.seed == recipes["pretrain"].run.seed == 7
    with pytest.raises(RecipeError, match="stages.sfx.*: no such stage"):
        load_pipeline(path, ["stages.sfx.run.max_steps=1"])


def test_a_stage_behind_a_rerun_one_does_not_resume_its_stale_checkpoints(in_tmp, capsys):
    stage_recipes(in_tmp)
    stages = [dict(s) for s in STAGES[:2]]
    stages[1]["overrides"] = {"model.name": "stage:pretrain", "run.save_every": 1}
    path = pipeline(in_tmp, stages)
    root = run_pipeline(path)
    (root / "sft" / "final").rename(in_tmp / "gone")  # sft killed after its checkpoints
    capsys.readouterr()
    run_pipeline(path, ["stages.pretrain.run.overwrite=true"])
    err = capsys.readouterr().err
    assert "stage 1/2 pretrain: pretrain" in err and "resuming from" not in err
    assert (root / "sft" / "final" / "adapter_config.json").is_file()
