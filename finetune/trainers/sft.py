"""Supervised fine-tuning on conversations (`trainer.type: sft`).

Algorithm: every row (messages, prompt_completion, sharegpt or alpaca format) becomes a chat
conversation, rendered with the chat template; the tokens of the turns selected by
`trainer.train_on` (default: every assistant turn, including the end-of-turn token that closes
it, so the model learns to stop) are trained with next-token cross-entropy, the rest masked.
The loss is the token mean over the whole optimizer step, across accumulation and ranks.
Batches are padding-free: a micro-batch's samples are concatenated into one row with position
ids restarting per sample and attention that never crosses samples (varlen FlashAttention on
GPU, SDPA per sample on CPU). `data.packing: true` first bin-packs samples into rows of
`tokenizer.max_length` (best-fit decreasing). Held-out metrics: token loss, and greedy
exact-match of the last assistant turn on the eval conversations.

Data: tokenized by `data.num_proc` processes into the Arrow cache and read from it memory-mapped
(`finetune.data.sft_data`); the samples equal `encode_conversations(read_conversations(...))`'s.

    finetune run recipes/sft_full.yaml
    finetune data recipes/sft_full.yaml          # audit the masks first
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path

from finetune.console import info
from finetune.data.formats import to_conversation
from finetune.data.sft_data import load_chats
from finetune.data.sources import BadRows, EncodeStats, mix_sources, split_holdout
from finetune.data.stops import check_learns_to_stop
from finetune.data.tokenizer_setup import load_tokenizer
from finetune.errors import DataError
from finetune.recipe.schema import Recipe
from finetune.rl.evaluate import exact_match
from finetune.train import engine
from finetune.train.collate import (
    PackedRows,
    collate_flat,
    collate_padded,
    pack_bins,
    pack_stream,
    packing_efficiency,
)
from finetune.train.plan import Plan


@dataclass
class Prepared:
    tokenizer: object
    train_units: Sequence  # samples, or packed rows (lists of samples), read from the cache on access
    eval_units: Sequence
    train_stats: EncodeStats
    eval_conversations: Sequence
    notes: list[str] = field(default_factory=list)
    packing_efficiency: float | None = None
    train_conversations: Sequence = ()
    stop_problems: object = None  # per train sample: where a trained turn misses its stop token (-1: none)


def read_conversations(recipe: Recipe, bad: BadRows | None = None) -> tuple[list, list]:
    """Train and eval conversations (eval: its own sources, a held-out fraction, or none)."""
    seed = recipe.run.seed
    train = mix_sources(recipe.data.train, "data.train", seed, to_conversation, bad)
    if recipe.data.eval:
        return train, mix_sources(recipe.data.eval, "data.eval", seed, to_conversation, bad)
    if recipe.data.eval_fraction:
        return split_holdout(train, recipe.data.eval_fraction, seed)
    return train, []


def prepare(recipe: Recipe, resume_from: Path | None = None) -> Prepared:
    """Data -> conversations -> masked samples (-> packed rows). Loads no model weights."""
    notes: list[str] = []
    tokenizer = load_tokenizer(recipe, resume_from=resume_from, notes=notes)
    bad = BadRows(recipe.data.on_bad_row, recipe.data.max_bad_rows)
    data = load_chats(recipe, tokenizer, bad)
    t = recipe.tokenizer
    notes += data.notes
    notes.append(f"train data: {data.stats.summary()}")
    if bad.count:
        notes.append(f"skipped {bad.count} bad rows (data.on_bad_row: skip)")
    prepared = Prepared(tokenizer, data.train, data.eval, data.stats, data.eval_conversations, notes,
                        train_conversations=data.train_conversations,
                        stop_problems=data.train.stop_problems() if data.stops_checked else None)
    if recipe.data.packing:
        lengths = data.train.lengths()
        prepared.train_units = PackedRows(data.train, pack_stream(lengths, t.max_length, recipe.data.packing_buffer))
        prepared.packing_efficiency = float(lengths.sum()) / max(len(prepared.train_units) * t.max_length, 1)
        notes.append(f"packed {len(data.train):,} samples into {len(prepared.train_units):,} rows of "
                     f"{t.max_length} ({100 * prepared.packing_efficiency:.1f}% full)")
    return prepared


def pack(samples: list[dict], max_length: int) -> tuple[list[list[dict]], float]:
    lengths = [len(s["input_ids"]) for s in samples]
    bins = pack_bins(lengths, max_length)
    return [[samples[i] for i in b] for b in bins], packing_efficiency(bins, lengths, max_length)


def check_stops(prepared: Prepared, max_length: int) -> None:
    """check_learns_to_stop on the train samples, from the flags the tokenizing workers set."""
    if prepared.stop_problems is None:  # the stop tokens could not be probed: the check says why
        check_learns_to_stop(prepared.tokenizer, _samples(prepared.train_units), max_length)
        return
    bad = prepared.stop_problems
    if not (bad >= 0).any():
        return
    units = prepared.train_units
    order = units.order if isinstance(units, PackedRows) else range(len(bad))
    i = next(n for n, s in enumerate(order) if bad[s] >= 0)  # numbered as check_learns_to_stop counts
    sample = units.samples[int(order[i])] if isinstance(units, PackedRows) else units[i]
    tok = prepared.tokenizer.decode([sample["input_ids"][bad[order[i]]]])
    raise DataError(f"data.train: sample {i}: a trained turn ends on {tok!r}, not a stop token; the model "
                    "would not learn to stop (check the chat template's end-of-turn token)")


def _samples(units):
    for u in units:
        yield from (u if isinstance(u, list) else [u])


def make_collate(recipe: Recipe, pad_id: int):
    """Units are samples, or packed rows (lists of samples) with data.packing."""
    if recipe.data.packing:
        return lambda units: collate_flat([s for row in units for s in row])
    if recipe.data.padding_free:
        return collate_flat
    return partial(collate_padded, pad_id=pad_id)


def plan(recipe: Recipe, prepared: Prepared | None = None, model_info=None) -> Plan:
    from finetune.models.loading import count_params_meta

    prepared = prepared or prepare(recipe)
    if model_info is None:
        total, trainable = count_params_meta(recipe, prepared.tokenizer)
        source, notes = recipe.model.name or "from scratch (model.init_config)", []
        if recipe.data.packing or recipe.data.padding_free:
            notes += _special_attention_meta(recipe)
    else:
        total, trainable = model_info.total_params, model_info.trainable_params
        source, notes = model_info.source, model_info.notes
    unit = "packed rows" if recipe.data.packing else "samples"
    return Plan("sft", source, total, trainable, len(prepared.train_units), prepared.train_stats.tokens,
                len(prepared.eval_units), unit=unit, notes=prepared.notes + notes)


def _special_attention_meta(recipe: Recipe) -> list[str]:
    """The dry-run's line about softcapping/sinks, read from a weightless (meta) model."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import load_config
    from finetune.train.attention import special_attention

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(recipe))
    note = special_attention(model)
    return [note] if note else []


def exact_match_metric(recipe: Recipe, tokenizer, conversations: Sequence):
    """evaluate_extra for the engine: greedy exact-match of each eval conversation's last reply."""
    n = recipe.trainer.exact_match_samples
    cases = list(islice((c.messages for c in conversations if c.messages[-1]["role"] == "assistant"), n))
    if not cases:
        return None
    prompts = [m[:-1] for m in cases]
    refs = [m[-1]["content"] or "" for m in cases]

    def metric(model) -> dict:
        score, _ = exact_match(model, tokenizer, prompts, refs, recipe.trainer.max_new_tokens)
        return {"eval_exact_match": score}

    return metric


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    from finetune.models.loading import load_model
    from finetune.train import fastpath
    from finetune.train.attention import enable_packed_attention, special_attention

    engine.start_process()  # this rank's device before any weight (QLoRA loads onto it)
    prepared = prepare(recipe, resume_from)
    if recipe.trainer.train_on != "all":  # what `finetune data` refuses, `finetune run` refuses too
        check_stops(prepared, recipe.tokenizer.max_length)
    model, model_info = load_model(recipe, prepared.tokenizer)
    if recipe.data.packing or recipe.data.padding_free:
        enable_packed_attention(model)
        if special := special_attention(model):
            model_info.notes.append(special)
    # Fused CE, compiled layers, batches counted and pinned on the CPU (docs/benchmarks.md).
    fast = fastpath.setup(recipe, model)
    for line in plan(recipe, prepared, model_info).lines(recipe, num_processes) + fast.notes:
        info(line)
    task = engine.SupervisedTask(
        model=model, tokenizer=prepared.tokenizer, train_units=prepared.train_units,
        eval_units=prepared.eval_units, loss_sum=fast.loss_sum, count_tokens=fast.count_tokens,
        collate=fast.wrap_collate(make_collate(recipe, prepared.tokenizer.pad_token_id)),
        eval_collate=collate_flat if recipe.data.padding_free or recipe.data.packing
        else partial(collate_padded, pad_id=prepared.tokenizer.pad_token_id),
        evaluate_extra=exact_match_metric(recipe, prepared.tokenizer, prepared.eval_conversations),
    )
    return engine.train(recipe, task, resume_from=resume_from)
