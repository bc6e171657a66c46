"""Pipeline recipes: several stages (training recipes and merges) run in order under one root.

    pipeline:
      output_dir: runs/story
      eval: {data: data/quickstart/prompts_eval.jsonl, rewards: [{type: numeric}]}
    stages:
      - name: pretrain
        recipe: recipes/pretrain_tiny.yaml
      - name: sft
        recipe: recipes/sft_lora_cpu.yaml
        overrides: {model.name: "stage:pretrain"}
      - name: merged
        merge: "stage:sft"

A value "stage:NAME" is the output of an EARLIER stage: `<root>/NAME/final` for a training stage,
`<root>/NAME` for a merge. Every stage writes to `<root>/NAME` (its run.output_dir is set so). All
stages are validated before anything runs (unknown or later stages, bad recipes and overrides);
a rerun skips the finished stages and resumes the unfinished one from its newest checkpoint.
With `pipeline.eval`, every stage's model is scored on held-out prompts and a table is printed
and written to `<root>/pipeline.json`; `<root>/plot.png` shows that table and each stage's curves.

Command-line overrides: `pipeline.KEY=V` sets the pipeline section, `stages.NAME.KEY=V` one
stage's recipe, any other `KEY=V` every training stage (run.overwrite=true reruns them all). A
stage that runs again makes every later stage run again. Stage recipe paths are relative to the
pipeline file's folder when the file is there, else to the working directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from finetune.errors import RecipeError
from finetune.recipe.schema import Recipe, RewardCfg, _set_dotted, load_recipe, parse_override

STAGE_REF = "stage:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PipelineEval(_Strict):
    data: str
    rewards: list[RewardCfg] = Field(default_factory=lambda: [RewardCfg(type="numeric")])
    max_new_tokens: int = Field(32, gt=0)
    max_samples: int | None = Field(None, gt=0)


class PipelineCfg(_Strict):
    output_dir: str
    eval: PipelineEval | None = None


class Stage(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    recipe: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    merge: str | None = None
    dtype: str | None = None  # merge: fp32 | bf16 | fp16

    @model_validator(mode="after")
    def _one_kind(self) -> Stage:
        if (self.recipe is None) == (self.merge is None):
            raise ValueError("a stage has either `recipe` (a training recipe path) or `merge` (stage:NAME)")
        return self


class Pipeline(_Strict):
    pipeline: PipelineCfg
    stages: list[Stage] = Field(min_length=1)


def is_pipeline(path: str | Path) -> bool:
    """A YAML file with a top-level `stages:` list is a pipeline."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return False  # load_recipe reports those properly
    return isinstance(data, dict) and "stages" in data


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Pipeline, list[tuple[Stage, Recipe | None]]]:
    """Parses and validates every stage (recipes loaded with their overrides, references checked)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    # pipeline.* overrides (pipeline.output_dir=runs/x) set the pipeline section; the rest go to every stage.
    # stages.NAME.* overrides (stages.ppo.run.max_steps=5) go to that stage only.
    mine: list[str] = []
    per_stage: dict[str, list[str]] = {}
    every: list[str] = []
    for o in overrides:
        head = o.split("=", 1)[0].strip()
        if head.startswith("pipeline."):
            mine.append(o)
        elif head.startswith("stages."):
            name, _, rest = o.strip()[len("stages."):].partition(".")
            per_stage.setdefault(name, []).append(rest)
        else:
            every.append(o)
    for item in mine:
        key, value = parse_override(item)
        if isinstance(data, dict) and isinstance(data.get("pipeline"), dict):
            _set_dotted(data, key, value, f"override {item!r}")
    try:
        pipe = Pipeline.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise RecipeError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    root = Path(pipe.pipeline.output_dir)
    unknown = set(per_stage) - {s.name for s in pipe.stages}
    if unknown:
        raise RecipeError(f"override stages.{sorted(unknown)[0]}.*: no such stage in {path} "
                          f"(stages: {', '.join(s.name for s in pipe.stages)})")
    seen: dict[str, Stage] = {}
    planned: list[tuple[Stage, Recipe | None]] = []
    for i, stage in enumerate(pipe.stages):
        key = f"{path}: stages.{i} ({stage.name})"
        if stage.name in seen:
            raise RecipeError(f"{key}: duplicate stage name")
        if stage.merge is not None:
            _resolve(stage.merge, seen, root, key)
            planned.append((stage, None))
        else:
            items = [f"{k}={_resolve(v, seen, root, key) if isinstance(v, str) else _yaml(v)}"
                     for k, v in stage.overrides.items()]
            items += [f"run.output_dir={root / stage.name}", *every, *per_stage.get(stage.name, [])]
            try:
                recipe = load_recipe(_recipe_path(path, stage.recipe), items)
            except RecipeError as e:
                raise RecipeError(f"{key}: {e}") from None
            planned.append((stage, recipe))
        seen[stage.name] = stage
    return pipe, planned


def _recipe_path(pipeline_file: Path, recipe: str) -> Path:
    """A stage's recipe path is relative to the pipeline file's folder, else to the working directory."""
    beside = pipeline_file.parent / recipe
    return beside if not Path(recipe).is_absolute() and beside.is_file() else Path(recipe)


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _resolve(value: str, seen: dict[str, Stage], root: Path, key: str) -> str:
    if not value.startswith(STAGE_REF):
        return value
    name = value[len(STAGE_REF):]
    if name not in seen:
        raise RecipeError(f"{key}: {value!r} refers to a stage that does not come before this one "
                          f"(earlier stages: {', '.join(seen) or 'none'})")
    return str(stage_output(root, seen[name]))


def stage_output(root: Path, stage: Stage) -> Path:
    return root / stage.name if stage.merge is not None else root / stage.name / "final"


def stage_done(root: Path, stage: Stage) -> bool:
    out = stage_output(root, stage)
    return (out / "config.json").is_file() or (out / "adapter_config.json").is_file()


def run_pipeline(path: str | Path, overrides: list[str] = (), dry_run: bool = False) -> Path:
    from finetune.console import info
    from finetune.run.launch import run_recipe

    pipe, planned = load_pipeline(path, overrides)
    root = Path(pipe.pipeline.output_dir)
    if dry_run:
        for stage, recipe in planned:
            what = f"merge {stage.merge}" if recipe is None else f"{recipe.trainer.type} from {stage.recipe}"
            info(f"stage {stage.name:<10} {what} -> {stage_output(root, stage)}")
        return root
    results: list[dict] = []
    rerun = False  # once a stage runs again, every later stage must too (its input changed)
    for i, (stage, recipe) in enumerate(planned, 1):
        out = stage_output(root, stage)
        title = f"[bold]stage {i}/{len(planned)} {stage.name}[/]"
        if stage_done(root, stage) and not rerun and not (recipe is not None and recipe.run.overwrite):
            info(f"{title}: finished earlier ({out}), skipped")
        elif recipe is None:
            info(f"{title}: merge {stage.merge}")
            _merge(stage, root, pipe)
            rerun = True
        else:
            info(f"{title}: {recipe.trainer.type} ({stage.recipe})")
            # Behind a stage that ran again, neither a finished run nor old checkpoints may be reused.
            run_recipe(recipe.model_copy(update={"run": recipe.run.model_copy(update={"overwrite": True})})
                       if rerun else recipe)
            rerun = True
        if pipe.pipeline.eval is not None:
            results.append({"stage": stage.name, "model": str(out), **evaluate_stage(out, pipe.pipeline.eval)})
            _write_results(root, results)
    if results:
        print_table(results)
    plot_pipeline(root, planned, results)
    return root


def plot_pipeline(root: Path, planned: list, results: list[dict]) -> None:
    """<root>/plot.png: held-out accuracy after each stage, then each training stage's curves."""
    from finetune.console import info
    from finetune.infer.plot import plot_story

    runs = [(stage.name, root / stage.name) for stage, recipe in planned
            if recipe is not None and (root / stage.name / "metrics.jsonl").is_file()]
    if not runs and not results:  # merges only, no eval: nothing to draw
        return
    path = plot_story(root / "plot.png", results, runs)
    info(f"plot: {path}")


def _merge(stage: Stage, root: Path, pipe: Pipeline) -> None:
    from finetune.models.merge import merge_adapter

    adapter = Path(_resolve(stage.merge, {s.name: s for s in pipe.stages}, root, stage.name))
    merge_adapter(adapter, root / stage.name, dtype=stage.dtype, force=(root / stage.name).exists())


def evaluate_stage(model_dir: Path, cfg: PipelineEval) -> dict:
    """Held-out greedy accuracy of one stage's model (a full model or an unmerged adapter)."""
    from finetune.infer.eval_cli import EvalData, eval_generations, prompt_set
    from finetune.infer.inference import Settings, load_for_inference
    from finetune.rl.rewards import build_rewards

    convs = prompt_set(EvalData(cfg.data, "prompts", cfg.max_samples), "exact_match", cfg.rewards[0].column)
    lm = load_for_inference(str(model_dir))
    rewards = build_rewards(cfg.rewards, key="pipeline.eval.rewards")
    result = eval_generations(lm, convs, rewards, "exact_match", Settings(max_new_tokens=cfg.max_new_tokens),
                              n=1, threshold=1.0, column=cfg.rewards[0].column)
    return {"accuracy": result.metrics["exact_match"], "stopped": 1.0 - result.metrics["truncated"]}


def _write_results(root: Path, results: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.json").write_text(json.dumps(results, indent=2))


def print_table(results: list[dict]) -> None:
    from rich.table import Table

    from finetune.console import console

    table = Table(title="held-out accuracy after each stage")
    keys = [k for k in results[0] if k not in ("stage", "model")]
    table.add_column("stage")
    for k in keys:
        table.add_column(k, justify="right")
    for r in results:
        table.add_row(r["stage"], *(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys))
    console.print(table)
