"""`finetune data RECIPE`: the pre-flight data audit.

Runs the trainer's data preparation (no model weights), prints a summary (rows, tokens,
trained-token fraction, truncated/dropped counts, packing efficiency) and renders samples with
the trained tokens highlighted. `--json` prints one object per sample instead:
{"input_ids": [...], "labels_mask": [0/1 ...], "tokens": ["..."]} (1 = the token is trained).

It fails (exit 2) when the data would train the wrong thing: a trained assistant turn whose stop
token is not trained (the model would never learn to stop), samples left with no trained token,
or a template whose training-time prompt differs from its inference-time generation prompt.
"""

from __future__ import annotations

import json
import sys

from rich.text import Text

from finetune.console import console
from finetune.data.stops import check_generation_prompt, check_learns_to_stop, labels_mask
from finetune.data.tokenizer import stop_token_ids
from finetune.errors import DataError
from finetune.recipe.schema import Recipe


def samples_of(units: list) -> list[dict]:
    """Units are samples, packed rows (lists of samples) or dpo pairs ({"chosen": sample, "rejected": sample})."""
    def expand(u) -> list[dict]:
        if isinstance(u, list):
            return u
        return [u["chosen"], u["rejected"]] if isinstance(u.get("chosen"), dict) else [u]

    return [s for u in units for s in expand(u)]


def audit(recipe: Recipe, as_json: bool = False, show: int = 3) -> int:
    from finetune.trainers import get_trainer

    trainer = get_trainer(recipe.trainer.type)
    prepared = trainer.prepare(recipe)
    tokenizer = prepared.tokenizer
    samples = samples_of(prepared.train_units)
    if as_json:
        for s in samples[: show if show >= 0 else None]:
            tokens = [tokenizer.decode([t]) for t in s["input_ids"]]
            sys.stdout.write(json.dumps({"input_ids": s["input_ids"], "labels_mask": labels_mask(s),
                                         "tokens": tokens}) + "\n")
    else:
        _print_summary(recipe, prepared, samples)
        for i, s in enumerate(samples[:show]):
            console.print(f"\n[bold]sample {i}[/] ({len(s['input_ids'])} tokens, "
                          f"{sum(labels_mask(s))} trained)")
            console.print(render(tokenizer, s))
    _check(recipe, prepared, samples)
    return 0


def _print_summary(recipe: Recipe, prepared, samples: list[dict]) -> None:
    tokens = sum(len(s["input_ids"]) for s in samples)
    trained = sum(sum(labels_mask(s)) for s in samples)
    console.print(f"[bold]{recipe.trainer.type}[/] data: {len(samples):,} samples, {tokens:,} tokens, "
                  f"{100 * trained / max(tokens, 1):.1f}% trained", soft_wrap=True)
    for note in getattr(prepared, "notes", []):
        console.print(f"  {note}", soft_wrap=True)
    if recipe.trainer.type in ("sft", "distill"):
        stops = [prepared.tokenizer.convert_ids_to_tokens(i) for i in stop_token_ids(prepared.tokenizer)]
        console.print(f"  stop tokens (a trained turn must end on one): {', '.join(stops)}", soft_wrap=True,
                      markup=False)
    if getattr(prepared, "packing_efficiency", None) is not None:
        console.print(f"  packing efficiency {100 * prepared.packing_efficiency:.1f}%")
    if console.is_terminal:
        console.print("  [black on green]trained[/] tokens highlighted; [dim]masked[/] tokens dim")
    else:
        console.print("  trained tokens shown ⟦between brackets⟧")


def render(tokenizer, sample: dict, brackets: bool | None = None) -> Text:
    """Trained tokens highlighted; without a terminal (logs, CI) trained runs are bracketed ⟦...⟧."""
    brackets = not console.is_terminal if brackets is None else brackets
    text, mask = Text(), labels_mask(sample)
    for i, (token_id, trained) in enumerate(zip(sample["input_ids"], mask, strict=True)):
        piece = tokenizer.decode([token_id]).replace("\n", "\u23ce\n")
        if brackets and trained and (i == 0 or not mask[i - 1]):
            text.append("⟦")
        text.append(piece, style="black on green" if trained else "dim")
        if brackets and trained and (i + 1 == len(mask) or not mask[i + 1]):
            text.append("⟧")
    return text


def _check(recipe: Recipe, prepared, samples: list[dict]) -> None:
    if recipe.trainer.type not in ("sft", "distill"):  # distill trains SFT's data and masks
        return
    stats = prepared.train_stats
    if stats.no_trained:
        raise DataError(f"data.train: {stats.no_trained} samples have no trained token (truncated before "
                        "the answer?); raise tokenizer.max_length or use tokenizer.overflow: drop")
    if recipe.trainer.train_on != "all":
        check_learns_to_stop(prepared.tokenizer, samples, recipe.tokenizer.max_length)
    for conv in prepared.train_conversations[:20]:
        check_generation_prompt(prepared.tokenizer, conv.messages, tools=conv.tools)
