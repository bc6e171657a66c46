"""Knowledge distillation (`trainer.type: distill`): a student learns a teacher's next-token distributions.

Algorithm: the data are SFT conversations, rendered and masked exactly as `trainer.type: sft` does
(finetune.trainers.sft.prepare): the trained tokens are the assistant turns `trainer.train_on`
selects, each with its end-of-turn token. Each micro-batch goes through the student (`model`,
optionally under a LoRA `adapter`) and through the frozen teacher (`trainer.distill.teacher`, a
model sharing the student's tokenizer, checked before any weight is read; eval mode, no gradients,
weights in the run's precision). At every trained position the loss is a divergence between the
teacher's and the student's next-token distributions (finetune.train.distill_losses): `forward_kl`
KL(teacher||student), `reverse_kl` KL(student||teacher) or `jsd`, GKD's generalised Jensen-Shannon
divergence with `beta`; at `temperature`; optionally on the teacher's `top_k` tokens plus one
bucket for the rest; plus `sft_weight` x the student's NLL of the data token. The sum over trained
tokens is divided by the optimizer step's trained tokens by the shared engine, as SFT's loss is.

On-policy (GKD, Agarwal et al. 2024): with `on_policy_fraction` lambda > 0, each micro-batch is,
with probability lambda (drawn from torch's seeded RNG, which checkpoints keep), replaced before it
is counted: for every sample the student samples a reply (`trainer.sampling`: temperature, top_p,
top_k, max_new_tokens; n is not used) to the sample's prompt, its tokens before its last trained
turn (the history and the generation header, as trained), and the divergence is taken on the
sampled tokens (the stop token included; the reply cut at tokenizer.max_length). Earlier trained
turns of that sample are not trained in that batch, and the NLL term is not applied there (those
tokens are the student's own); a sample cut before its last reply keeps its data tokens.
Held-out: eval_loss (off-policy, on the eval conversations), eval_divergence, eval_nll, and
greedy exact-match of each eval conversation's last reply, as SFT reports it.

metrics.jsonl adds, as means per trained token: divergence, nll (the student's NLL of the trained
tokens, logged whatever sft_weight is), on_policy (with lambda > 0: the share of trained tokens the
student sampled). Differences from TRL's GKDTrainer: the sampling temperature is
trainer.sampling.temperature, not the loss's; no seq_kd (sample replies from the teacher with
`finetune generate` and distil on those instead); the teacher never sees the data's padding.

    finetune run recipes/distill.yaml
    finetune run recipes/distill.yaml trainer.distill.loss=jsd trainer.distill.on_policy_fraction=0.5
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from finetune.console import info
from finetune.data.tokenizer import stop_token_ids
from finetune.recipe.schema import DistillCfg, Recipe
from finetune.rl.rollout import sample_from_ids
from finetune.train import engine
from finetune.train.collate import Batch, collate_flat, collate_padded
from finetune.train.distill_losses import distill_sums, trained_positions
from finetune.train.losses import IGNORE_INDEX
from finetune.train.plan import Plan
from finetune.trainers import sft


@dataclasses.dataclass
class DistillBatch(Batch):
    """A micro-batch and whether its trained tokens were sampled by the student."""

    on_policy: bool = False


def prompt_of(sample: dict) -> list[int] | None:
    """The tokens before the sample's last trained turn (None when nothing before it is untrained)."""
    labels = sample["labels"]
    end = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(sample["input_ids"][:start]) or None


class DistillCollate:
    """Units (samples, or packed rows of samples) -> a DistillBatch; on-policy with probability lambda."""

    def __init__(self, recipe: Recipe, model, tokenizer) -> None:
        self.cfg, self.sampling, self.model = recipe.trainer.distill, recipe.trainer.sampling, model
        self.max_length = recipe.tokenizer.max_length
        self.stops = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        flat = recipe.data.padding_free or recipe.data.packing
        self.collate = collate_flat if flat else lambda samples: collate_padded(samples, self.pad_id)

    def __call__(self, units: list) -> DistillBatch:
        samples = [s for u in units for s in (u if isinstance(u, list) else [u])]
        lam = self.cfg.on_policy_fraction
        on_policy = lam > 0 and (lam >= 1 or float(torch.rand(())) < lam)
        if on_policy:
            samples = self.student_replies(samples)
        batch = self.collate(samples)
        return DistillBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)},
                            on_policy=on_policy)

    def student_replies(self, samples: list[dict]) -> list[dict]:
        """Each sample's last reply replaced by one the student samples now; only those tokens trained."""
        prompts = [prompt_of(s) for s in samples]
        todo = [i for i, p in enumerate(prompts) if p is not None and len(p) < self.max_length]
        replies = sample_from_ids(self.model, [prompts[i] for i in todo], self.sampling, self.stops, self.pad_id)
        out = list(samples)
        for i, (reply, _) in zip(todo, replies, strict=True):
            prompt = prompts[i]
            reply = reply[:self.max_length - len(prompt)]
            out[i] = {"input_ids": prompt + reply, "labels": [IGNORE_INDEX] * len(prompt) + reply}
        return out


class DistillLoss:
    """The engine's loss_sum: summed divergence (+ sft_weight x NLL), and summed statistics."""

    def __init__(self, cfg: DistillCfg, teacher: torch.nn.Module) -> None:
        self.cfg, self.teacher = cfg, teacher

    def __call__(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        logits = model(**batch.model_inputs()).logits
        with torch.no_grad():
            teacher_logits = self.teacher(**batch.model_inputs()).logits
        div, nll = distill_sums(logits, teacher_logits, batch.labels, cfg.loss, cfg.beta, cfg.temperature, cfg.top_k)
        on_policy = getattr(batch, "on_policy", False)
        loss = div + cfg.sft_weight * nll if cfg.sft_weight and not on_policy else div
        stats = {"divergence": div.detach(), "nll": nll.detach()}
        if cfg.on_policy_fraction > 0:
            stats["on_policy"] = trained_positions(batch.labels).sum() * float(on_policy)
        return loss, stats


def describe(cfg: DistillCfg) -> str:
    loss = f"jsd beta {cfg.beta:g}" if cfg.loss == "jsd" else cfg.loss
    parts = [f"distill loss {loss}", f"temperature {cfg.temperature:g}"]
    if cfg.top_k:
        parts.append(f"teacher top-{cfg.top_k} + rest")
    if cfg.sft_weight:
        parts.append(f"+ {cfg.sft_weight:g} x NLL")
    parts.append(f"on-policy fraction {cfg.on_policy_fraction:g}")
    return ", ".join(parts)


def prepare(recipe: Recipe, resume_from: Path | None = None) -> sft.Prepared:
    """SFT's data preparation, then the teacher's tokenizer checked against the student's (no weights)."""
    from finetune.models.teacher import check_teacher

    prepared = sft.prepare(recipe, resume_from)
    prepared.notes.insert(0, check_teacher(recipe, prepared.tokenizer))
    if recipe.run.chunked_ce or recipe.run.compile:
        prepared.notes.append("run.chunked_ce and run.compile apply to pretrain and sft; ignored")
    return prepared


def plan(recipe: Recipe, prepared: sft.Prepared | None = None, model_info=None) -> Plan:
    result = sft.plan(recipe, prepared or prepare(recipe), model_info)
    result.trainer = "distill"
    result.notes[:0] = [describe(recipe.trainer.distill),
                        "memory above is the student's: the teacher's weights and logits come on top"]
    return result


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    from finetune.models.loading import count_params, load_model
    from finetune.models.teacher import load_teacher
    from finetune.train.attention import enable_packed_attention

    state = engine.start_process()  # this rank's device before any weight
    prepared = prepare(recipe, resume_from)
    if recipe.trainer.train_on != "all":
        sft.check_stops(prepared, recipe.tokenizer.max_length)
    model, model_info = load_model(recipe, prepared.tokenizer)
    teacher = load_teacher(recipe, prepared.tokenizer, state.device)
    if recipe.data.packing or recipe.data.padding_free:
        enable_packed_attention(model)  # attention must not cross the concatenated samples
        enable_packed_attention(teacher)
    dtype = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    model_info.notes.append(f"teacher: {count_params(teacher)[0]:,} params, {dtype}, frozen, eval mode")
    for line in plan(recipe, prepared, model_info).lines(recipe, num_processes):
        info(line)
    flat = recipe.data.padding_free or recipe.data.packing
    task = engine.SupervisedTask(
        model=model, tokenizer=prepared.tokenizer, train_units=prepared.train_units,
        eval_units=prepared.eval_units, collate=DistillCollate(recipe, model, prepared.tokenizer),
        eval_collate=collate_flat if flat else lambda s: collate_padded(s, prepared.tokenizer.pad_token_id),
        loss_sum=DistillLoss(recipe.trainer.distill, teacher),
        evaluate_extra=sft.exact_match_metric(recipe, prepared.tokenizer, prepared.eval_conversations),
    )
    return engine.train(recipe, task, resume_from=resume_from)
