"""Recipe checks that need the file system but no torch: model references, data paths, resume
targets, trackers. Run by `finetune validate` and before every run (after the schema's own checks)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from finetune.errors import RecipeError
from finetune.recipe.schema import TRACKERS, DataSource, Recipe

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "/")) and ".." not in name


def check_model_ref(name: str, key: str) -> None:
    """A model reference must be an existing local dir or a syntactically valid Hub id."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise RecipeError(f"{key}: {name!r} is a file; expected a model directory or a Hub id")
        return
    if not looks_like_hub_id(name):
        hint = " (it is written by another run: run that recipe first)" if name.startswith("runs/") else ""
        raise RecipeError(f"{key}: {name!r} is neither an existing local directory nor a Hub id (org/name){hint}")


def check_recipe(recipe: Recipe) -> list[str]:
    """Checks that need the file system; returns notes for the user. Raises RecipeError."""
    notes: list[str] = []
    if recipe.model.name is not None:
        check_model_ref(recipe.model.name, "model.name")
    if recipe.tokenizer.name is not None:
        check_model_ref(recipe.tokenizer.name, "tokenizer.name")
    if recipe.trainer.type == "distill":
        teacher = recipe.trainer.distill.teacher
        if teacher is None:
            raise RecipeError("trainer.distill.teacher: distill needs a teacher (a model dir or Hub id sharing the "
                              "student's tokenizer)")
        check_model_ref(teacher, "trainer.distill.teacher")
    if isinstance(recipe.model.init_config, str):
        cfg = Path(recipe.model.init_config)
        if not cfg.exists():
            raise RecipeError(f"model.init_config: {cfg} not found (a config.json file, a model dir or a dict)")
    if recipe.model.init_config is not None and recipe.tokenizer.name is None and recipe.tokenizer.train is None:
        raise RecipeError(
            "tokenizer: a model built from model.init_config needs tokenizer.name or tokenizer.train "
            "(train a byte-level BPE tokenizer on the training text)"
        )
    for section in ("train", "eval"):
        for i, src in enumerate(getattr(recipe.data, section) or []):
            _check_source(src, f"data.{section}.{i}.path")
    if recipe.data.eval and recipe.data.eval_fraction:
        raise RecipeError("data: set either data.eval (sources) or data.eval_fraction, not both")
    if recipe.run.resume not in ("auto", "never") and not Path(recipe.run.resume).is_dir():
        raise RecipeError(f"run.resume: {recipe.run.resume!r} is not 'auto', 'never' or a checkpoint directory")
    import importlib.util

    for tracker in recipe.run.report_to:  # checked before any weight is loaded, not at the first log
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            raise RecipeError(f"run.report_to: {tracker} is not installed (pip install {tracker.replace('_', '-')})")
    if recipe.model.trust_remote_code:
        notes.append("model.trust_remote_code is on: code from the model repository will run")
    if recipe.launch.fsdp_state_dict != "full":
        notes.append("launch.fsdp_state_dict is no longer used: fsdp checkpoints are always sharded (a file per "
                     "process) and final/ always one consolidated model")
    return notes


def _check_source(src: DataSource, key: str) -> None:
    p = Path(src.path).expanduser()
    if p.exists() or any(ch in src.path for ch in "*?["):
        if not p.exists() and not sorted(Path().glob(src.path)):
            raise RecipeError(f"{key}: no files match {src.path!r}")
        return
    if src.path.endswith((".jsonl", ".json", ".txt", ".parquet", ".csv")) or not looks_like_hub_id(src.path):
        raise RecipeError(f"{key}: data file {src.path!r} does not exist")


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be made and written as an output directory (None: it can), found with a
    probe directory in its nearest existing ancestor that is removed at once: checked before any
    weight is loaded, so a typo costs a second, not a run."""
    if path.exists() and not path.is_dir():
        return f"{path} exists and is not a directory"
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{path} cannot be created: {ancestor} is a file, not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-write-check-", dir=ancestor))
    except OSError as e:
        return f"{path} is not writable ({e.strerror or e} in {ancestor})"
    return None
