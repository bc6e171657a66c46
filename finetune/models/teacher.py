"""The teacher of `trainer.type: distill`: checked against the student's tokenizer before any weight
is read, then loaded by the same code as the student (finetune.models.loading), frozen, in eval
mode and in the run's precision (bf16/fp16 weights on a GPU run in that precision, fp32 on the CPU).

Distillation compares two next-token distributions id by id, so teacher and student must share
one tokenizer: the same vocabulary (every token string at the same id, added tokens included) and
a teacher output head covering it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.errors import RecipeError, UserError
from finetune.models.loading import load_config, load_model, run_half_dtype
from finetune.recipe.schema import ModelCfg, Recipe

KEY = "trainer.distill.teacher"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def teacher_recipe(recipe: Recipe) -> Recipe:
    """The recipe the teacher loads with: its own name, no adapter, no quantization, no checkpointing."""
    m = recipe.model
    dtype = _DTYPE_NAMES[run_half_dtype(recipe) or torch.float32]
    model = ModelCfg(name=recipe.trainer.distill.teacher, dtype=dtype, attn_implementation=m.attn_implementation,
                     trust_remote_code=m.trust_remote_code, allow_bin=m.allow_bin)
    return recipe.model_copy(update={"model": model, "adapter": None})


def vocabulary_difference(student_tokenizer, teacher_tokenizer) -> str | None:
    """None when both map the same token strings to the same ids, else what differs (a few words)."""
    mine, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if mine == theirs:
        return None
    if len(mine) != len(theirs):
        return f"{len(theirs)} tokens against the student's {len(mine)}"
    moved = sum(theirs.get(token) != i for token, i in mine.items())
    return f"{moved} of {len(mine)} tokens have other ids"


def check_teacher(recipe: Recipe, tokenizer) -> str:
    """RecipeError (one line, naming trainer.distill.teacher) unless the teacher shares the student's
    tokenizer and its output head covers it. Reads tokenizer files and the config only; returns a plan note."""
    from transformers import AutoTokenizer

    name = recipe.trainer.distill.teacher
    if name is None:
        raise RecipeError(f"{KEY}: distill needs a teacher (a model dir or Hub id sharing the student's tokenizer)")
    if (Path(name) / "adapter_config.json").is_file():
        raise RecipeError(f"{KEY}: {name!r} is a LoRA adapter; merge it into its base first (finetune merge "
                          f"{name} OUT_DIR, or a pipeline `merge:` stage) and distil from the merged model")
    try:
        theirs = AutoTokenizer.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{KEY}: cannot load a tokenizer from {name!r}: {_first_line(e)}") from None
    difference = vocabulary_difference(tokenizer, theirs)
    if difference is not None:
        raise RecipeError(f"{KEY}: {name!r} has another tokenizer than the student ({difference}); distillation "
                          "compares the two models' next-token distributions id by id, so both need the same one")
    try:
        config = load_config(teacher_recipe(recipe))
    except UserError as e:
        raise RecipeError(f"{KEY}: {str(e).removeprefix('model.name: ')}") from None
    rows = config.get_text_config().vocab_size
    if rows < len(tokenizer):
        raise RecipeError(f"{KEY}: {name!r} scores {rows} token ids but the tokenizer has {len(tokenizer)} "
                          "(tokens added after the teacher was trained cannot be distilled)")
    return f"teacher {name} ({config.model_type})"


def load_teacher(recipe: Recipe, tokenizer, device) -> torch.nn.Module:
    """The frozen teacher on `device`, in eval mode (no dropout), weights in the run's precision."""
    teacher, _ = load_model(teacher_recipe(recipe), tokenizer)
    teacher.requires_grad_(False)
    return teacher.to(device).eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
