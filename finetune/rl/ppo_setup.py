"""Around the PPO update: prompts, rewards, batch layout and plan (before any weight is loaded),
the held-out score and the samples log.

Every check that can fail without weights happens here, so `finetune run --dry-run` and the start
of `finetune run` catch it in seconds: prompts that leave no room for generation, a
rollout batch that does not split into minibatches of whole micro-batches, a pad token that is also
a stop token, a critic started from a reward model with another tokenizer, a value head on a
model type without a hidden-state body.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from finetune.data.formats import to_conversation
from finetune.data.sources import mix_sources, split_holdout, with_format
from finetune.data.tokenizer import stop_token_ids
from finetune.data.tokenizer_setup import load_tokenizer
from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import Recipe
from finetune.rl.rewards import Rewards, build_rewards
from finetune.rl.rollout import encode_prompt
from finetune.train.plan import Plan


@dataclass
class Prepared:
    tokenizer: object
    prompts: list  # Conversations of format `prompts` (extra: the columns verifiers read)
    prompt_ids: list[list[int]]  # rendered with the generation prompt
    eval_prompts: list
    eval_ids: list[list[int]]
    rewards: Rewards
    eval_rewards: Rewards  # trainer.ppo.eval_rewards, else the training rewards
    stop_ids: list[int]
    notes: list[str]


@dataclass
class Layout:
    """How one update's rollout is cut: sequences per process, minibatches, micro-batches."""

    per_process: int  # sequences sampled per process and update
    prompts_per_process: int
    minibatch: int  # sequences per minibatch and process
    accumulation: int  # micro-batches per minibatch

    @classmethod
    def of(cls, recipe: Recipe, world: int) -> Layout:
        ppo, n, micro = recipe.trainer.ppo, recipe.trainer.sampling.n, recipe.run.micro_batch_size
        if not ppo.has_critic and n < 2:
            raise RecipeError(f"trainer.ppo.advantage: {ppo.advantage} compares the samples of each prompt: "
                              f"trainer.sampling.n must be at least 2 (got {n})")
        if not ppo.has_critic and (ppo.critic_warmup_updates or ppo.critic_lr is not None):
            raise RecipeError(f"trainer.ppo.advantage: {ppo.advantage} builds no critic; critic_warmup_updates "
                              "and critic_lr apply to advantage: gae only")
        key = "trainer.ppo.rollout_batch_size"
        if ppo.rollout_batch_size % (world * n):
            raise RecipeError(f"{key}: {ppo.rollout_batch_size} sequences do not split into {world} process(es) "
                              f"x whole prompts of trainer.sampling.n={n} samples")
        per = ppo.rollout_batch_size // world
        if per % ppo.minibatches or (per // ppo.minibatches) % micro:
            raise RecipeError(f"{key}: {per} sequences per process (of {world}) do not split into "
                              f"trainer.ppo.minibatches={ppo.minibatches} minibatches of whole micro-batches of "
                              f"run.micro_batch_size={micro}; pick sizes where minibatches x micro_batch_size "
                              f"divides {per}")
        return cls(per, per // n, per // ppo.minibatches, per // ppo.minibatches // micro)

    def updates(self, recipe: Recipe, prompts: int, world: int) -> int:
        """run.max_steps counts updates; without it, run.epochs passes over the prompts."""
        per_epoch = prompts // (self.prompts_per_process * world)
        if per_epoch == 0:
            raise DataError(f"data.train: {prompts} prompts are fewer than one update's "
                            f"{self.prompts_per_process * world} (trainer.ppo.rollout_batch_size / sampling.n)")
        return recipe.run.max_steps or max(1, math.ceil(recipe.run.epochs * per_epoch))


class PPOPlan(Plan):
    """The shared plan lines, counted in optimizer steps: a minibatch is micro x accumulation x
    processes sequences, and every update makes epochs x minibatches steps."""

    def lines(self, recipe: Recipe, num_processes: int = 1) -> list[str]:
        ppo, lay = recipe.trainer.ppo, Layout.of(recipe, num_processes)
        view = recipe.model_copy(deep=True)
        view.run.grad_accum = lay.accumulation
        view.run.max_steps = lay.updates(recipe, self.train_units, num_processes) * ppo.epochs * ppo.minibatches
        return super().lines(view, num_processes)


def read_prompts(recipe: Recipe, section: str) -> list:
    sources = [with_format(src, f"data.{section}.{i}.path", expected="prompts")
               for i, src in enumerate(getattr(recipe.data, section) or [])]
    for i, src in enumerate(sources):
        if src.format != "prompts":
            raise DataError(f"data.{section}.{i}.format: ppo samples completions of format 'prompts' rows "
                            f"(a prompt column, plus the columns its verifiers read), got {src.format!r}")
    return mix_sources(sources, f"data.{section}", recipe.run.seed, to_conversation)


def encode_prompts(recipe: Recipe, tokenizer, conversations: list, key: str) -> tuple[list, list[list[int]]]:
    """Rendered prompt ids; a prompt that leaves no room for max_new_tokens is an error (or dropped
    with tokenizer.overflow: drop): cutting a question changes what is asked."""
    room = recipe.tokenizer.max_length - recipe.trainer.sampling.max_new_tokens
    kept, ids = [], []
    for conv in conversations:
        x = encode_prompt(tokenizer, conv.messages)
        if len(x) > room:
            if recipe.tokenizer.overflow == "drop":
                continue
            raise DataError(f"{conv.origin}: the prompt is {len(x)} tokens, but tokenizer.max_length "
                            f"{recipe.tokenizer.max_length} - trainer.sampling.max_new_tokens "
                            f"{recipe.trainer.sampling.max_new_tokens} leaves {room} (raise max_length, lower "
                            f"max_new_tokens, or drop such prompts with tokenizer.overflow=drop)")
        kept.append(conv)
        ids.append(x)
    if conversations and not kept:
        raise DataError(f"{key}: every prompt is longer than the {room} tokens left for it")
    return kept, ids


def prepare(recipe: Recipe, resume_from: Path | None = None, world: int | None = None) -> Prepared:
    """Tokenizer, prompts, rewards and every check that needs no weights."""
    from finetune.models.loading import load_config
    from finetune.rl.ppo_models import check_critic_tokenizer, check_value_head_support, critic_source

    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    Layout.of(recipe, world)
    notes: list[str] = []
    critic_source(recipe)
    if recipe.launch.strategy != "ddp":
        raise RecipeError(f"launch.strategy: ppo runs under ddp; {recipe.launch.strategy} shards the weights that "
                          "every process samples from, which this trainer does not gather yet")
    if recipe.trainer.ppo.has_critic:
        if recipe.trainer.ppo.critic == "adapter" and recipe.adapter is None:
            raise RecipeError("trainer.ppo.critic: adapter puts the critic on the policy's base as a second LoRA "
                              "adapter; it needs an adapter: section (or critic: separate)")
        check_value_head_support(load_config(recipe))
    tokenizer = load_tokenizer(recipe, resume_from=resume_from, notes=notes)
    stops = stop_token_ids(tokenizer)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in stops:
        raise RecipeError("tokenizer: ppo needs a pad token distinct from the stop tokens (EOS, end-of-turn), "
                          "or padding after a stop would read as more stops")
    check_critic_tokenizer(recipe, tokenizer)
    prompts, evals = read_prompts(recipe, "train"), read_prompts(recipe, "eval")
    if recipe.data.eval_fraction:
        prompts, evals = split_holdout(prompts, recipe.data.eval_fraction, recipe.run.seed)
    evals = evals[:recipe.trainer.ppo.eval_prompts or None]
    sizes = dict(max_length=recipe.tokenizer.max_length, batch_size=recipe.trainer.sampling.batch_size)
    rewards = build_rewards(recipe.trainer.rewards, "trainer.rewards", **sizes)
    eval_cfgs = recipe.trainer.ppo.eval_rewards
    eval_rewards = build_rewards(eval_cfgs, "trainer.ppo.eval_rewards", **sizes) if eval_cfgs else rewards
    rewards.check_rows(prompts, "data.train")
    eval_rewards.check_rows(evals, "data.eval")
    rewards.check_tokenizer(tokenizer)
    eval_rewards.check_tokenizer(tokenizer)
    prompts, ids = encode_prompts(recipe, tokenizer, prompts, "data.train")
    evals, eval_ids = encode_prompts(recipe, tokenizer, evals, "data.eval")
    s = recipe.trainer.sampling
    if s.top_k or s.top_p < 1:
        notes.append("sampling.top_k/top_p is on: samples then come from a filtered distribution while the "
                     "ratio and KL use the full one (off-policy); N+ samples with temperature only")
    return Prepared(tokenizer, prompts, ids, evals, eval_ids, rewards, eval_rewards, stops, notes)


def plan(recipe: Recipe, prepared: Prepared | None = None, model_info=None) -> Plan:
    from finetune.models.loading import count_params_meta
    from finetune.rl.ppo_models import base_copies

    world = int(os.environ.get("WORLD_SIZE", "1"))
    p = prepared or prepare(recipe, world=world)
    total, trainable = ((model_info.total_params, model_info.trainable_params) if model_info
                        else count_params_meta(recipe, p.tokenizer))
    ppo, lay = recipe.trainer.ppo, Layout.of(recipe, world)
    copies, what = base_copies(recipe)
    beta = f"adaptive from {ppo.kl_coef:g} toward KL {ppo.kl_target:g}" if ppo.kl_target else f"{ppo.kl_coef:g}"
    notes = p.notes + [
        f"update: {ppo.rollout_batch_size} sequences ({lay.prompts_per_process * world} prompts x "
        f"{recipe.trainer.sampling.n}) -> {ppo.epochs} epochs x {ppo.minibatches} minibatches = "
        f"{ppo.epochs * ppo.minibatches} optimizer steps; minibatch = {lay.accumulation} micro-batches of "
        f"{recipe.run.micro_batch_size} x {world} process(es) (run.grad_accum is not used); "
        f"{lay.updates(recipe, len(p.prompts), world)} updates (run.max_steps counts updates)",
        f"models: {copies} cop{'y' if copies == 1 else 'ies'} of the base in memory: {'; '.join(what)}",
        f"advantage: {_advantage_line(ppo, recipe.trainer.sampling.n)}",
        f"rewards: {', '.join(p.rewards.names)}; {_kl_line(ppo)}, beta {beta}; "
        f"temperature {recipe.trainer.sampling.temperature:g}, max_new_tokens {recipe.trainer.sampling.max_new_tokens}",
    ]
    if p.eval_rewards is not p.rewards:
        notes.append(f"held-out score: {', '.join(p.eval_rewards.names)} (trainer.ppo.eval_rewards)")
    if ppo.critic_warmup_updates:
        notes.append(f"critic warm-up: the policy is frozen for the first {ppo.critic_warmup_updates} updates")
    tokens = sum(map(len, p.prompt_ids))
    return PPOPlan("ppo", recipe.model.name or "from scratch (model.init_config)", total, trainable,
                len(p.prompts), tokens, len(p.eval_prompts), unit="prompts", notes=notes)


def _advantage_line(ppo, n: int) -> str:
    if ppo.advantage == "gae":
        return f"GAE (gamma {ppo.gamma:g}, lambda {ppo.lam:g}) from the critic"
    base = ("group mean" + (" / group std" if ppo.grpo_std else " (Dr. GRPO: no std division)")
            if ppo.advantage == "grpo" else "leave-one-out mean of the other samples")
    return (f"{ppo.advantage}, no critic: one per completion, its reward minus the {base} over the {n} "
            f"samples of its prompt; loss normalisation {ppo.loss_norm}")


def _kl_line(ppo) -> str:
    if ppo.kl_term == "loss":
        return "KL k3 as a loss term"
    return f"KL {ppo.kl_estimator} in the reward"


class ChatScorer:
    """ScoreFn for chat prompts: completions decoded without their stop token, scored by the
    recipe's rewards with each prompt row's columns; keeps the texts for samples.jsonl."""

    def __init__(self, prepared: Prepared, conversations: list, rewards: Rewards | None = None) -> None:
        self.p, self.convs, self.rewards = prepared, conversations, rewards or prepared.rewards
        self.texts: list[str] = []

    def __call__(self, prompt_ids, responses) -> list[float]:
        stops = set(self.p.stop_ids)
        self.texts = [self.p.tokenizer.decode(r[:-1] if r and r[-1] in stops else r, skip_special_tokens=True)
                      for r in responses]
        return self.rewards([c.messages for c in self.convs], self.texts, [c.extra for c in self.convs]).total


def evaluate(policy, p: Prepared, recipe: Recipe, all_reduce, accelerator) -> dict:
    """Held-out score at trainer.ppo.eval_temperature (0: greedy), over every process's share."""
    import torch

    from finetune.rl.ppo_models import generate

    temperature = recipe.trainer.ppo.eval_temperature
    mine = list(range(accelerator.process_index, len(p.eval_prompts), accelerator.num_processes))
    totals = torch.zeros(4, dtype=torch.float64)  # score, stopped, length, prompts
    if mine:
        sampling = recipe.trainer.sampling.model_copy(update={"temperature": temperature or 1.0})
        ids = [p.eval_ids[i] for i in mine]
        with accelerator.autocast():  # as the rollouts: the policy's training precision, not fp32 decoding
            gen = generate(policy, ids, sampling, p.stop_ids, p.tokenizer.pad_token_id, greedy=temperature == 0)
        scores = ChatScorer(p, [p.eval_prompts[i] for i in mine], p.eval_rewards)(ids, gen.responses())
        totals += torch.tensor([sum(scores), float(gen.stopped.sum()), float(gen.response_mask.sum()), len(mine)],
                               dtype=torch.float64)
    if all_reduce is not None:  # every process takes part, with or without prompts of its own
        totals = all_reduce(totals)
    n = max(float(totals[3]), 1.0)
    return {"eval_score": float(totals[0]) / n, "eval_stop_fraction": float(totals[1]) / n,
            "eval_length": float(totals[2]) / n}


def write_samples(path: Path, step: int, scorer: ChatScorer, exp, n: int) -> None:
    """The first n completions of this process's rollout, appended to samples.jsonl."""
    from finetune.train.losses import masked_sum

    kl = masked_sum(exp.logprobs - exp.ref_logprobs, exp.mask, dim=1)
    with path.open("a", encoding="utf-8") as f:
        for i in range(min(n, len(scorer.texts))):
            f.write(json.dumps({"step": step, "prompt": scorer.convs[i].messages, "completion": scorer.texts[i],
                                "score": float(exp.raw_scores[i]), "stopped": bool(exp.gen.stopped[i]),
                                "kl": float(kl[i])}) + "\n")
