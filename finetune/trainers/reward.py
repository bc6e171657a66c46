"""Reward model training (`trainer.type: reward`): pairwise Bradley-Terry on preference data.

Algorithm: every `preference` row (prompt, chosen, rejected: strings or message lists) becomes
two conversations, prompt + chosen and prompt + rejected, rendered with the chat template exactly
as the scorer will render sampled completions later (finetune.models.reward_model.encode_for_reward).
A causal LM gets a one-output scalar head (transformers' *ForSequenceClassification with one
label; full weights or LoRA) and the reward r(x, y) is the head's output at the last real token,
located from the attention mask. The loss of a pair is -log sigmoid(r_c - r_r - margin)
(Bradley-Terry; the `margin` column only with reward_model.use_margin, as Llama 2) plus
reward_model.center_coef * (r_c + r_r)^2; the shared engine averages it over the pairs of each
optimizer step. Held-out metrics: eval_loss and eval_accuracy (the fraction of pairs with
r_c > r_r). final/ loads with AutoModelForSequenceClassification (a LoRA run:
AutoPeftModelForSequenceClassification) and plugs into rs_sft as {type: model, path: .../final}.

    finetune run recipes/reward.yaml
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.console import info
from finetune.data.formats import to_preference
from finetune.data.sources import mix_sources, split_holdout, with_format
from finetune.data.tokenizer_setup import load_tokenizer
from finetune.errors import DataError
from finetune.models.reward_model import bradley_terry_loss, encode_for_reward, last_token_rewards, pad_right
from finetune.recipe.schema import Recipe
from finetune.train import engine
from finetune.train.plan import Plan


@dataclass
class PairBatch:
    """A micro-batch of pairs: rows 0..P-1 are the chosen conversations, P..2P-1 the rejected."""

    input_ids: torch.Tensor  # (2P, time), right-padded
    attention_mask: torch.Tensor  # (2P, time)
    margins: torch.Tensor | None  # (P,) or None when margins are not used
    seq_lens: list[int]

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    @property
    def num_tokens(self) -> int:
        return sum(self.seq_lens)

    def to(self, device) -> PairBatch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
                                   margins=move(self.margins))


@dataclass
class Prepared:
    tokenizer: object
    train_units: list[dict]
    eval_units: list[dict]
    tokens: int
    notes: list[str]


def read_pairs(recipe: Recipe) -> tuple[list, list]:
    sources = {}
    for section in ("train", "eval"):
        sources[section] = [with_format(src, f"data.{section}.{i}.path", expected="preference")
                            for i, src in enumerate(getattr(recipe.data, section) or [])]
        for i, src in enumerate(sources[section]):
            if src.format != "preference":
                raise DataError(f"data.{section}.{i}.format: trainer {recipe.trainer.type} reads format 'preference' "
                                f"(prompt, chosen, rejected), got {src.format!r}")
    seed = recipe.run.seed
    train = mix_sources(sources["train"], "data.train", seed, to_preference)
    if sources["eval"]:
        return train, mix_sources(sources["eval"], "data.eval", seed, to_preference)
    if recipe.data.eval_fraction:
        return split_holdout(train, recipe.data.eval_fraction, seed)
    return train, []


def encode_pairs(recipe: Recipe, tokenizer, pairs: list, notes: list[str], key: str) -> list[dict]:
    """{"chosen": ids, "rejected": ids, "margin"} units; over-long pairs cut or dropped."""
    t, use_margin = recipe.tokenizer, recipe.trainer.reward_model.use_margin
    units, cut, dropped = [], 0, 0
    for pair in pairs:
        if use_margin and pair.margin is None:
            raise DataError(f"{pair.origin}: reward_model.use_margin is on but this row has no 'margin' column")
        chosen = encode_for_reward(tokenizer, pair.prompt + pair.chosen)
        rejected = encode_for_reward(tokenizer, pair.prompt + pair.rejected)
        if max(len(chosen), len(rejected)) > t.max_length:
            if t.overflow == "drop":
                dropped += 1
                continue
            cut += 1
        units.append({"chosen": chosen[:t.max_length], "rejected": rejected[:t.max_length],
                      "margin": pair.margin if use_margin else None})
    if not units:
        raise DataError(f"{key}: no preference pair left ({dropped} dropped as longer than tokenizer.max_length)")
    if cut or dropped:
        notes.append(f"{key}: {cut} pairs truncated, {dropped} dropped (tokenizer.max_length {t.max_length})")
    return units


def prepare(recipe: Recipe, resume_from: Path | None = None) -> Prepared:
    """Preference rows -> token-id pairs. Loads no model weights."""
    notes: list[str] = []
    tokenizer = load_tokenizer(recipe, resume_from=resume_from, notes=notes)
    train, evals = read_pairs(recipe)
    train_units = encode_pairs(recipe, tokenizer, train, notes, "data.train")
    eval_units = encode_pairs(recipe, tokenizer, evals, notes, "data.eval") if evals else []
    tokens = sum(len(u["chosen"]) + len(u["rejected"]) for u in train_units)
    if recipe.data.packing:
        notes.append("data.packing does not apply to reward models (pairs are padded); ignored")
    return Prepared(tokenizer, train_units, eval_units, tokens, notes)


def collate_pairs(units: list[dict], pad_id: int) -> PairBatch:
    rows = [u["chosen"] for u in units] + [u["rejected"] for u in units]
    input_ids, mask = pad_right(rows, pad_id)
    margins = None
    if units and units[0]["margin"] is not None:
        margins = torch.tensor([u["margin"] for u in units], dtype=torch.float32)
    return PairBatch(input_ids, mask, margins, [len(r) for r in rows])


def pair_rewards(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    rewards = last_token_rewards(model, batch.input_ids, batch.attention_mask)
    return rewards[:batch.num_pairs], rewards[batch.num_pairs:]


def make_loss_sum(center_coef: float):
    """The engine's loss_sum: summed pair losses (the engine divides by the step's pair count)."""
    def loss_sum(model, batch: PairBatch) -> torch.Tensor:
        chosen, rejected = pair_rewards(model, batch)
        return bradley_terry_loss(chosen, rejected, batch.margins, center_coef).sum()

    return loss_sum


def accuracy_metric(units: list[dict], pad_id: int, batch_size: int):
    """evaluate_extra: pairwise accuracy (r_c > r_r) and the mean reward gap on held-out pairs."""
    @torch.no_grad()
    def metric(model) -> dict:
        device = next(model.parameters()).device
        gaps = []
        for start in range(0, len(units), batch_size):
            chosen, rejected = pair_rewards(model, collate_pairs(units[start:start + batch_size], pad_id).to(device))
            gaps.append(chosen - rejected)
        gap = torch.cat(gaps)
        return {"eval_accuracy": (gap > 0).float().mean().item(), "eval_reward_gap": gap.mean().item()}

    return metric


def plan(recipe: Recipe, prepared: Prepared | None = None, model_info=None) -> Plan:
    from finetune.models.loading import count_params_meta

    prepared = prepared or prepare(recipe)
    if model_info is None:
        total, trainable = count_params_meta(recipe, prepared.tokenizer)
        source, notes = f"{recipe.model.name} + scalar head", []
    else:
        total, trainable = model_info.total_params, model_info.trainable_params
        source, notes = model_info.source, model_info.notes
    return Plan("reward", source, total, trainable, len(prepared.train_units), prepared.tokens,
                len(prepared.eval_units), unit="pairs", notes=prepared.notes + notes)


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    from finetune.models.reward_model import load_reward_model

    engine.start_process()  # this rank's device before any weight (QLoRA loads onto it)
    prepared = prepare(recipe, resume_from)
    model, model_info = load_reward_model(recipe, prepared.tokenizer)
    for line in plan(recipe, prepared, model_info).lines(recipe, num_processes):
        info(line)
    pad_id = prepared.tokenizer.pad_token_id
    collate = lambda units: collate_pairs(units, pad_id)  # noqa: E731
    task = engine.SupervisedTask(
        model=model, tokenizer=prepared.tokenizer, train_units=prepared.train_units,
        eval_units=prepared.eval_units, collate=collate,
        loss_sum=make_loss_sum(recipe.trainer.reward_model.center_coef),
        count_tokens=lambda batch: batch.num_pairs,  # the loss is a mean over pairs
        evaluate_extra=accuracy_metric(prepared.eval_units, pad_id, recipe.run.micro_batch_size)
        if prepared.eval_units else None,
    )
    return engine.train(recipe, task, resume_from=resume_from)
