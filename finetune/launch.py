"""Running a recipe in this process: output-dir checks, resume decision, dry-run, trainer call.

`finetune run` runs in-process (pdb works, and it runs unchanged under `accelerate launch -m
finetune` or `torchrun`, where accelerate reads the process group from the environment).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from finetune.errors import RecipeError
from finetune.metrics import console, info
from finetune.recipe import Recipe, check_recipe, dump_recipe, recipe_differences, recipe_to_dict


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_resume(recipe: Recipe) -> Path | None:
    """Which checkpoint to resume from, or None for a fresh run. Refuses to mix two runs."""
    from finetune.checkpoint import STATE_FILE, latest_checkpoint

    run = recipe.run
    out = Path(run.output_dir)
    if run.resume not in ("auto", "never"):
        ckpt = Path(run.resume)
        if not (ckpt / STATE_FILE).is_file():
            raise RecipeError(f"run.resume: {ckpt} is not a checkpoint directory (no {STATE_FILE})")
        return ckpt
    if not out.exists() or run.overwrite:
        return None
    ckpt = latest_checkpoint(out)
    saved = out / "recipe.yaml"
    if ckpt is None:
        if (out / "final").exists():
            raise RecipeError(f"run.output_dir: {out} already holds a finished run (final/); choose another "
                              "run.output_dir or set run.overwrite=true to replace it")
        return None
    if run.resume == "never":
        raise RecipeError(f"run.output_dir: {out} holds checkpoints and run.resume is 'never'; choose another "
                          "run.output_dir or set run.overwrite=true")
    if saved.is_file():
        diffs = recipe_differences(yaml.safe_load(saved.read_text()), recipe_to_dict(recipe))
        if diffs:
            shown = ", ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "")
            raise RecipeError(f"run.output_dir: {out} holds checkpoints of a different run (differs in {shown}); "
                              "resuming needs the same recipe: choose another run.output_dir")
    return ckpt


def run_recipe(recipe: Recipe, dry_run: bool = False) -> Path | None:
    from transformers.utils import logging as hf_logging

    from finetune.trainers import get_trainer

    hf_logging.disable_progress_bar()  # our own progress output is the one to read
    for note in check_recipe(recipe):
        info(f"[yellow]note:[/] {note}")
    trainer = get_trainer(recipe.trainer.type)
    resume_from = resolve_resume(recipe)
    if dry_run:
        console.print(dump_recipe(recipe), markup=False)
        for line in trainer.plan(recipe).lines(recipe, world_size()):
            console.print(line, markup=False)
        if resume_from is not None:
            console.print(f"resume     from {resume_from}", markup=False)
        return None
    out = Path(recipe.run.output_dir)
    if recipe.run.overwrite and out.exists() and resume_from is None and is_main_process():
        shutil.rmtree(out)
    if resume_from is not None:
        info(f"resuming from {resume_from}")
    from accelerate.utils import set_seed

    set_seed(recipe.run.seed)  # before any weights are initialised: from-scratch runs are reproducible
    final = trainer.train(recipe, resume_from=resume_from, num_processes=world_size())
    info(f"done: {final}")
    return final
