"""Recipe -> ready tokenizer: load (or train) it, choose the chat template, settle the pad token.

Kept apart from tokenizer.py (templates and encoding) so that module stays free of recipe and
run-directory concerns. A tokenizer trained by a run is saved in every checkpoint and reloaded
on resume: BPE training may break ties differently between processes, and a resumed model must
see exactly the ids it was trained with.
"""

from __future__ import annotations

from pathlib import Path

from finetune.data.reasoning import training_twin
from finetune.data.tokenizer import (
    apply_chat_template_choice,
    ensure_pad_token,
    stop_token_ids,
    train_bpe_tokenizer,
)
from finetune.errors import RecipeError, TemplateError, UserError
from finetune.recipe.schema import Recipe


def load_tokenizer(recipe: Recipe, texts: list[str] | None = None, resume_from: Path | None = None,
                   notes: list[str] | None = None):
    """The tokenizer for a run; `notes` collects what was changed (for the plan)."""
    notes = notes if notes is not None else []
    t = recipe.tokenizer
    saved = resume_from / "tokenizer" if resume_from is not None else None
    if saved is not None and saved.is_dir():
        return _from_pretrained(str(saved), recipe, "checkpoint tokenizer")
    if t.train is not None:
        if not texts:
            raise RecipeError("tokenizer.train: needs training text (a text-format data.train source)")
        try:
            tokenizer = train_bpe_tokenizer(texts, t.train.vocab_size)
        except ValueError as e:
            raise RecipeError(f"tokenizer.train.vocab_size: {e}") from None
        notes.append(f"trained a byte-level BPE tokenizer: {len(tokenizer)} tokens")
    else:
        name = t.name or recipe.model.name
        if name is None:
            raise RecipeError("tokenizer: set tokenizer.name or tokenizer.train for a model built from init_config")
        tokenizer = _from_pretrained(name, recipe, "tokenizer.name" if t.name else "model.name")
    try:
        added = apply_chat_template_choice(tokenizer, t.chat_template)
    except TemplateError as e:
        if t.chat_template == "auto" and recipe.trainer.type == "pretrain":
            added = []  # plain-text pretraining needs no template
        else:
            raise RecipeError(f"tokenizer.chat_template: {e}") from None
    if added:
        notes.append(f"added template tokens {added}")
    twin = training_twin(tokenizer.chat_template)
    if twin is not None:  # the reasoning-mask rule (README "Reasoning models") applies
        notes.append(f"chat template {twin[0]}: training text rendered and masked by trl's {twin[0]}_training "
                     "twin (its own template kept for generation); train_on: last_assistant trains only the "
                     "final turn, on the inference rendering")
    # PPO pads after a stop token, so its pad must be no stop; elsewhere masks come from lengths
    # (reward models included: last_token_rewards reads the attention mask, not the pad id).
    stops = set(stop_token_ids(tokenizer)) if recipe.trainer.type == "ppo" else None
    pad_note = ensure_pad_token(tokenizer, stops)
    if "already set" not in pad_note:
        notes.append(pad_note)
    return tokenizer


def _from_pretrained(name: str, recipe: Recipe, key: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            name, revision=recipe.model.revision if key == "model.name" else None,
            trust_remote_code=recipe.model.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        text = str(e).strip().splitlines()
        raise UserError(f"{key}: cannot load a tokenizer from {name!r}: {text[0] if text else type(e).__name__}") \
            from None
