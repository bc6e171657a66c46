"""Direct preference optimisation (`trainer.type: dpo`): DPO, cDPO, robust DPO, IPO and SimPO.

Algorithm: every preference row (prompt, chosen, rejected; every format `preference` reads)
becomes two conversations, prompt + chosen and prompt + rejected, masked by the chat-template
stage as SFT masks an assistant turn (encode_chat, train_on `completion`): the prompt untrained,
the response's assistant turns and their end-of-turn token trained. A micro-batch holds the
chosen samples, then the rejected ones, in one padding-free row (padded rows with
data.padding_free false), so one forward scores both; a response's log-prob is the sum over its
trained tokens, as in TRL. The reference is the policy with its adapter disabled under LoRA (no
second copy); with full weights, the starting model's log-probs, computed in one pass after the
model is prepared and kept in each pair (trainer.dpo.precompute_ref), so no second model stays in
memory. SimPO needs no reference. The per-pair losses (finetune.train.preference_losses) are
averaged over the pairs of each optimizer step by the shared engine (finetune.train.engine).
metrics.jsonl adds, as means per pair: rewards/chosen, rewards/rejected, rewards/margin,
rewards/accuracy (chosen reward > rejected), logps/chosen, logps/rejected; eval_ versions on the
held-out pairs. Departure: the precomputed reference runs in eval mode (no dropout).

    finetune run recipes/dpo.yaml
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.console import info
from finetune.data.tokenizer import encode_chat
from finetune.data.tokenizer_setup import load_tokenizer
from finetune.errors import DataError
from finetune.recipe.schema import DPOCfg, Recipe
from finetune.train import engine
from finetune.train.collate import Batch, collate_flat, collate_padded
from finetune.train.plan import Plan
from finetune.train.preference_losses import REFERENCE_FREE, preference_loss, sequence_logps
from finetune.trainers.reward import read_pairs


@dataclass
class PairBatch:
    """A micro-batch of P pairs: samples 0..P-1 are the chosen conversations, P..2P-1 the rejected."""

    batch: Batch
    sample_ids: torch.Tensor  # (rows, time): the sample each token belongs to
    ref_logps: torch.Tensor | None  # (2P,) precomputed reference log-probs, or None

    @property
    def num_pairs(self) -> int:
        return self.batch.num_samples // 2

    @property
    def input_ids(self) -> torch.Tensor:
        return self.batch.input_ids

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device) -> PairBatch:
        ref = None if self.ref_logps is None else self.ref_logps.to(device)
        return dataclasses.replace(self, batch=self.batch.to(device), sample_ids=self.sample_ids.to(device),
                                   ref_logps=ref)


@dataclass
class Prepared:
    tokenizer: object
    train_units: list[dict]
    eval_units: list[dict]
    tokens: int
    notes: list[str]


def encode_pairs(recipe: Recipe, tokenizer, pairs: list, notes: list[str], key: str) -> list[dict]:
    """{"chosen": sample, "rejected": sample} units (samples as encode_chat makes them)."""
    t = recipe.tokenizer
    units, cut, dropped, empty = [], 0, 0, 0
    for pair in pairs:
        sides = []
        for reply in (pair.chosen, pair.rejected):
            try:
                sides.append(encode_chat(tokenizer, pair.prompt + reply, train_on="completion",
                                         max_length=t.max_length, overflow=t.overflow))
            except DataError as e:  # TemplateError too: the row names the problem better
                raise type(e)(f"{pair.origin}: {e}") from None
        if None in sides:
            dropped += 1
            continue
        if any(all(label == -100 for label in s["labels"][1:]) for s in sides):
            empty += 1  # truncated before the response: nothing to compare
            continue
        cut += any(s["truncated"] for s in sides)
        chosen, rejected = ({"input_ids": s["input_ids"], "labels": s["labels"]} for s in sides)
        units.append({"chosen": chosen, "rejected": rejected})
    if not units:
        raise DataError(f"{key}: no preference pair left ({dropped} dropped, {empty} without a response token "
                        f"within tokenizer.max_length {t.max_length})")
    if cut or dropped or empty:
        notes.append(f"{key}: {cut} pairs truncated, {dropped + empty} dropped (tokenizer.max_length {t.max_length})")
    return units


def prepare(recipe: Recipe, resume_from: Path | None = None) -> Prepared:
    """Preference rows -> masked chosen/rejected samples. Loads no model weights."""
    notes: list[str] = []
    tokenizer = load_tokenizer(recipe, resume_from=resume_from, notes=notes)
    train, evals = read_pairs(recipe)
    train_units = encode_pairs(recipe, tokenizer, train, notes, "data.train")
    eval_units = encode_pairs(recipe, tokenizer, evals, notes, "data.eval") if evals else []
    tokens = sum(len(u[side]["input_ids"]) for u in train_units for side in ("chosen", "rejected"))
    if recipe.data.packing:
        notes.append("data.packing does not apply to dpo (each micro-batch is one row already); ignored")
    if recipe.run.chunked_ce or recipe.run.compile:
        notes.append("run.chunked_ce and run.compile apply to pretrain and sft; ignored")
    return Prepared(tokenizer, train_units, eval_units, tokens, notes)


def collate_pairs(units: list[dict], flat: bool, pad_id: int) -> PairBatch:
    samples = [u["chosen"] for u in units] + [u["rejected"] for u in units]
    batch = collate_flat(samples) if flat else collate_padded(samples, pad_id)
    n = batch.num_samples
    if flat:
        sample_ids = torch.repeat_interleave(torch.arange(n), torch.tensor(batch.seq_lens))[None]
    else:
        sample_ids = torch.arange(n)[:, None].expand_as(batch.input_ids)
    ref = None
    if "ref" in units[0]:
        ref = torch.tensor([u["ref"][0] for u in units] + [u["ref"][1] for u in units], dtype=torch.float32)
    return PairBatch(batch, sample_ids, ref)


def uses_precomputed_reference(recipe: Recipe) -> bool:
    cfg = recipe.trainer.dpo
    if cfg.loss in REFERENCE_FREE:
        return False
    return recipe.adapter is None if cfg.precompute_ref is None else cfg.precompute_ref


class DPOLoss:
    """The engine's loss_sum: summed pair losses plus summed statistics (means per pair in the logs)."""

    def __init__(self, cfg: DPOCfg, adapter_model=None) -> None:
        # adapter_model: the PeftModel whose disabled adapter is the reference (None: precomputed or none).
        self.cfg, self.adapter_model = cfg, adapter_model

    @staticmethod
    def logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(**batch.batch.model_inputs()).logits
        return sequence_logps(logits, batch.batch.labels, batch.sample_ids, batch.batch.num_samples)

    def reference(self, model, batch: PairBatch) -> torch.Tensor | None:
        if self.cfg.loss in REFERENCE_FREE:
            return None
        if batch.ref_logps is not None:
            return batch.ref_logps
        if self.adapter_model is None:
            raise RuntimeError("dpo: no reference log-probs (neither precomputed nor an adapter to disable)")
        # Through the wrapped model (DDP / FSDP hooks, accelerate's autocast), adapter off.
        with torch.no_grad(), self.adapter_model.disable_adapter():
            return self.logps(model, batch)[0]

    def __call__(self, model, batch: PairBatch) -> tuple[torch.Tensor, dict]:
        cfg, p = self.cfg, batch.num_pairs
        logps, counts = self.logps(model, batch)
        ref = self.reference(model, batch)
        out = preference_loss(cfg.loss, logps[:p], logps[p:], None if ref is None else ref[:p],
                              None if ref is None else ref[p:], counts[:p], counts[p:], cfg.beta,
                              cfg.label_smoothing, cfg.gamma)
        stats = out.stats()
        stats["logps/chosen"], stats["logps/rejected"] = logps[:p].detach().sum(), logps[p:].detach().sum()
        losses = out.losses
        if cfg.sft_weight:
            # Keeps the chosen reply likely: DPO alone may lower both replies and move the mass elsewhere.
            nll = -logps[:p] / counts[:p].clamp(min=1)
            losses = losses + cfg.sft_weight * nll
            stats["nll/chosen"] = nll.detach().sum()
        return losses.sum(), stats


def reference_pass(units_lists: list[list[dict]], collate, batch_size: int, adapter_model=None):
    """on_prepared: every pair's reference log-probs from the starting weights, stored in the pair."""
    @torch.no_grad()
    def run(model, accelerator) -> None:
        model.eval()
        off = adapter_model.disable_adapter() if adapter_model is not None else nullcontext()
        # Every rank scores every pair: sharded models need the same forwards on all ranks.
        with off, accelerator.autocast():
            for units in units_lists:
                for start in range(0, len(units), batch_size):
                    chunk = units[start:start + batch_size]
                    logps = DPOLoss.logps(model, collate(chunk).to(accelerator.device))[0].tolist()
                    for k, unit in enumerate(chunk):
                        unit["ref"] = [logps[k], logps[len(chunk) + k]]
        model.train()
        info(f"reference log-probs of {sum(map(len, units_lists)):,} pairs computed", accelerator)

    return run


def plan(recipe: Recipe, prepared: Prepared | None = None, model_info=None) -> Plan:
    from finetune.models.loading import count_params_meta

    prepared = prepared or prepare(recipe)
    if model_info is None:
        total, trainable = count_params_meta(recipe, prepared.tokenizer)
        source, notes = recipe.model.name or "from scratch (model.init_config)", []
    else:
        total, trainable = model_info.total_params, model_info.trainable_params
        source, notes = model_info.source, model_info.notes
    cfg = recipe.trainer.dpo
    ref = ("none (reference-free)" if cfg.loss in REFERENCE_FREE else
           "precomputed from the starting weights" if uses_precomputed_reference(recipe) else "the adapter disabled")
    notes = [f"dpo loss {cfg.loss}, beta {cfg.beta:g}; reference: {ref}", *prepared.notes, *notes]
    return Plan("dpo", source, total, trainable, len(prepared.train_units), prepared.tokens,
                len(prepared.eval_units), unit="pairs", notes=notes)


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    from finetune.models.loading import load_model
    from finetune.train.attention import enable_packed_attention

    engine.start_process()  # this rank's device before any weight (QLoRA loads onto it)
    prepared = prepare(recipe, resume_from)
    model, model_info = load_model(recipe, prepared.tokenizer)
    flat = recipe.data.padding_free
    if flat:
        enable_packed_attention(model)  # attention must not cross the concatenated samples
    for line in plan(recipe, prepared, model_info).lines(recipe, num_processes):
        info(line)
    pad_id = prepared.tokenizer.pad_token_id
    collate = lambda units: collate_pairs(units, flat, pad_id)  # noqa: E731
    adapter_model = model if recipe.adapter is not None else None
    precompute = uses_precomputed_reference(recipe)
    task = engine.SupervisedTask(
        model=model, tokenizer=prepared.tokenizer, train_units=prepared.train_units,
        eval_units=prepared.eval_units, collate=collate,
        loss_sum=DPOLoss(recipe.trainer.dpo, None if precompute else adapter_model),
        count_tokens=lambda batch: batch.num_pairs,  # the loss is a mean over pairs
        on_prepared=reference_pass([prepared.train_units, prepared.eval_units], collate,
                                   recipe.run.micro_batch_size, adapter_model) if precompute else None,
    )
    return engine.train(recipe, task, resume_from=resume_from)
