"""The output directory of a trainer that works in rounds (rs_sft; iterative schemes later).

    <run.output_dir>/
      recipe.yaml              the resolved recipe; a resumed run must match it (rounds may grow)
      metrics.jsonl            one record per round (round 0: the start model's held-out numbers)
      rounds/round-r/          samples.jsonl, pairs.jsonl, sft_train.jsonl, and the round's SFT run
                               (recipe.yaml, metrics.jsonl, checkpoints/, final/); round.json last
      final/                   the last trained round's final/ (hard links: no second copy)

A round is finished when its round.json exists; files are written to a temporary name and
renamed, so a run killed at any moment leaves only whole files behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from finetune.console import info
from finetune.errors import RecipeError
from finetune.recipe.schema import Recipe, recipe_differences, recipe_to_dict, write_recipe

# Keys that may change when a run is resumed: asking for more rounds continues the same run.
ROUND_MUTABLE = ("trainer.rejection.rounds",)


def round_dir(out: Path, r: int) -> Path:
    return Path(out) / "rounds" / f"round-{r}"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def start_run_dir(recipe: Recipe, out: Path) -> None:
    """Writes recipe.yaml, or checks that the run being resumed is the same run."""
    saved = out / "recipe.yaml"
    if not saved.is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(recipe, saved)
        return
    diffs = [d for d in recipe_differences(yaml.safe_load(saved.read_text()), recipe_to_dict(recipe))
             if d not in ROUND_MUTABLE]
    if diffs:
        raise RecipeError(f"run.output_dir: {out} holds rounds of a different run (differs in "
                          f"{', '.join(diffs[:4])}); choose another run.output_dir or set run.overwrite=true")
    if recipe.run.resume == "never" and (out / "rounds").is_dir():
        raise RecipeError(f"run.output_dir: {out} holds rounds and run.resume is 'never'; choose another "
                          "run.output_dir or set run.overwrite=true")
    info(f"resuming {recipe.trainer.type} in {out}: finished rounds are read back")
    write_recipe(recipe, saved)


def publish(src: Path, dst: Path) -> None:
    """dst becomes a copy of src (hard links where the file system allows: no second copy of the
    weights), written beside it and renamed, so it is never half there."""
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a, b):
        try:
            return os.link(a, b)
        except OSError:  # another file system, or no hard links there
            return shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
