"""Proximal policy optimisation for RLHF (`trainer.type: ppo`).

Algorithm ("The N+ Implementation Details of RLHF with PPO", Huang et al. 2024), per update:
  1. sample a completion of each prompt (plain temperature sampling, left-padded prompts), cut
     after the first stop token (EOS or the template's end-of-turn, kept in the response);
  2. one no-grad forward of the policy (old log-probs), the reference (adapters disabled, or a
     frozen copy) and the critic (values), logits divided by the sampling temperature throughout;
  3. score s (verifiers and/or a reward model at the last real token), optionally whitened and
     clipped, minus a penalty when no stop token was produced; per-token rewards
     r_t = -beta * kl_t, with s added at the last response token itself (the stop token);
  4. GAE (gamma, lambda) advantages, whitened over the whole rollout on all processes; returns = A + V;
  5. K epochs x M shuffled minibatches, one optimizer step each: clipped-ratio loss + c_v * clipped
     value loss (- entropy bonus), token means over the minibatch on all processes.
beta is fixed, or adapted toward kl_target (Ziegler et al. 2019).

Critic-free (`trainer.ppo.advantage`): no critic is built and there is no value loss; the rollout
holds trainer.sampling.n consecutive samples of each prompt, and every token of a completion gets
its sequence's advantage. grpo (DeepSeekMath, Shao et al. 2024): (R - group mean) / (group std +
1e-4), or without the division (grpo_std: false, Dr. GRPO, Liu et al. 2025, with loss_norm:
constant); KL by default as a loss term beta * k3(policy, reference) per token. rloo (Ahmadian et
al. 2024): R minus the mean of the prompt's other samples, with R = score - beta * sum_t kl_t (KL in
the reward, as the paper). Whitening applies to GAE only: the group baseline takes its place.

Departures from N+: the missing-EOS penalty is subtracted from the score (TRL) instead of
replacing it, so truncated answers keep their ranking; score normalisation is per rollout batch
(optional) rather than a reward-model bias fitted on SFT data; the learning rate follows the
recipe's scheduler per optimizer step (N+ anneals linearly per update); no truncation at a period
token; a critic started from the policy (verifier-only runs) or the memory-lean adapter critic
gets a fresh, zero-initialised value head, optionally with its own learning rate (critic_lr: such
a head takes hundreds of steps at a policy's learning rate); sampling.n > 1 samples per prompt
are allowed (N+ uses 1); the held-out score is greedy by default (N+ samples at temperature 0.01).

    finetune run recipes/ppo_cpu.yaml              # quickstart SFT model, numeric verifier, CPU
    finetune launch recipes/ppo.yaml --gpus 8
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.console import info
from finetune.recipe.schema import PPOCfg, Recipe, SamplingCfg, write_recipe
from finetune.rl.ppo_models import ActorCritic, Generated, adapters_disabled, generate, model_inputs, response_logits
from finetune.rl.ppo_setup import ChatScorer, Layout, Prepared, evaluate, plan, prepare, write_samples
from finetune.train import checkpoint, engine
from finetune.train.guards import NumericGuard, Preempted, StopSignal
from finetune.train.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    gather_logprobs,
    group_advantages,
    kl_penalty,
    masked_moments,
    masked_sum,
    masked_whiten,
    per_token_rewards,
    token_weights,
)
from finetune.train.metrics import MetricsLogger

# (prompt ids, response ids with the stop token) per sequence -> one score per sequence
ScoreFn = Callable[[list[list[int]], list[list[int]]], Sequence[float]]


@dataclass
class Experience:
    """One rollout batch of this process; per-token tensors are (rows, response width)."""

    gen: Generated
    raw_scores: torch.Tensor  # (rows,) from the score function
    scores: torch.Tensor  # after normalisation, clipping and the missing-EOS penalty
    logprobs: torch.Tensor  # old log-probs: the policy's no-grad forward right after sampling
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor  # the estimator used in the reward (k1 or k3)
    rewards: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.gen.response_mask

    def inputs(self, rows: torch.Tensor | slice) -> dict:
        return model_inputs(self.gen.query[rows], self.gen.query_mask[rows], self.gen.response[rows],
                            self.gen.response_mask[rows])


@dataclass
class KLController:
    """Fixed beta, or the adaptive controller of Ziegler et al. (2019): beta moves by at most 20%
    of n / horizon per update toward the target KL per sequence."""

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n / self.horizon


class _Sums:
    """Sums and counts of logged quantities, reduced over processes in one call."""

    def __init__(self) -> None:
        self.sums: dict[str, list] = {}
        self.fixed: dict[str, float] = {}  # already global (computed from all-reduced moments)

    def add(self, name: str, total, count) -> None:
        # Tensors stay on their device until means(): no host sync per micro-batch.
        entry = self.sums.setdefault(name, [0.0, 0.0])
        entry[0] = entry[0] + (total.detach().double() if torch.is_tensor(total) else float(total))
        entry[1] = entry[1] + float(count)

    def means(self, all_reduce) -> dict[str, float]:
        names = list(self.sums)
        t = torch.tensor([[float(self.sums[n][0]), self.sums[n][1]] for n in names], dtype=torch.float64)
        if all_reduce is not None and names:
            t = all_reduce(t)
        return {n: float(t[i, 0] / max(t[i, 1], 1e-12)) for i, n in enumerate(names)} | self.fixed


class PPO:
    """The PPO update on token-level prompts: `step(prompts, score_fn)` samples, scores, computes
    advantages and runs K x M optimizer steps; returns the logged statistics of that update.
    Trainers and tests drive it directly; `train(recipe)` wires recipes, data and logging around it."""

    def __init__(self, model: ActorCritic, optimizer, cfg: PPOCfg, sampling: SamplingCfg, *, accelerator,
                 micro_batch_size: int, stop_ids: Sequence[int] = (), pad_id: int = 0, scheduler=None,
                 reference: torch.nn.Module | None = None, max_grad_norm: float | None = 1.0, seed: int = 0,
                 guard=None) -> None:
        self.cfg, self.sampling, self.acc = cfg, sampling, accelerator
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped: ActorCritic = accelerator.unwrap_model(self.model)
        self.scheduler, self.reference, self.guard = scheduler, reference, guard
        self.micro, self.max_grad_norm, self.seed = micro_batch_size, max_grad_norm, seed
        self.stop_ids, self.pad_id = list(stop_ids), pad_id
        self.kl_ctl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
        if reference is not None:
            reference.eval()
        if not cfg.has_critic and (sampling.n < 2 or self.unwrapped.critic is not None):
            raise ValueError(f"advantage {cfg.advantage}: no critic and trainer.sampling.n >= 2 samples per prompt")
        self.updates_done = self.skipped_steps = 0
        critic = self.unwrapped.critic_parameter_names()
        self.actor_params = [p for n, p in self.unwrapped.named_parameters() if p.requires_grad and n not in critic]
        self.all_reduce = self._sum_over_processes if accelerator.num_processes > 1 else None

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.acc.reduce(t.clone().to(self.acc.device), reduction="sum").to(t.device)

    # ------------------------------------------------------------ rollout

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], score_fn: ScoreFn) -> tuple[Experience, _Sums]:
        cfg, policy = self.cfg, self.unwrapped.policy
        # Eval mode and the training autocast for sampling and scoring alike: the samples come from
        # the distribution the ratio and KL are computed under (and bf16 decoding is the fast one).
        self.model.eval()
        with self.acc.autocast():
            gen = generate(policy, prompts, self.sampling, self.stop_ids, self.pad_id)
        raw = torch.tensor([float(s) for s in score_fn(prompts, gen.responses())], device=gen.query.device)
        logprobs, ref_logprobs, values = self._score_tokens(gen)
        scores = self._shape_scores(raw, gen.stopped)
        mask = gen.response_mask
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator)
        rewards = per_token_rewards(scores, kl, mask, self.kl_ctl.beta if cfg.kl_term == "reward" else 0.0)
        if cfg.has_critic:
            advantages, returns = gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        else:
            # Rows arrive as groups of sampling.n samples of one prompt (see train); the KL, when in
            # the reward, enters summed over the sequence (RLOO's r - beta * KL per completion).
            seq = group_advantages(rewards.sum(1), self.sampling.n, cfg.advantage, cfg.grpo_std)
            advantages = returns = seq[:, None] * mask
        stats = self._rollout_stats(gen, raw, scores, logprobs, ref_logprobs, kl, rewards, values, advantages, returns)
        if cfg.whiten_advantages and cfg.has_critic:  # a group baseline is the critic-free runs' normaliser
            advantages = masked_whiten(advantages, mask, all_reduce=self.all_reduce)
        exp = Experience(gen, raw, scores, logprobs, ref_logprobs, values, kl, rewards, advantages, returns)
        return exp, stats

    def _score_tokens(self, gen: Generated) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Old log-probs and values (the same forward as training: the ratio starts at exactly 1) and
        reference log-probs, in micro-batches."""
        temperature, out = self.sampling.temperature, ([], [], [])
        for start in range(0, gen.query.shape[0], self.micro):
            rows = slice(start, start + self.micro)
            inputs = model_inputs(gen.query[rows], gen.query_mask[rows], gen.response[rows], gen.response_mask[rows])
            with self.acc.autocast():
                logits, values = self.unwrapped(**inputs)
                ref_logits = self._reference_logits(inputs)
            target = gen.response[rows]
            out[0].append(gather_logprobs(logits, target, temperature))
            out[1].append(gather_logprobs(ref_logits, target, temperature))
            out[2].append(torch.zeros_like(out[0][-1]) if values is None else values.float())
        return tuple(torch.cat(x) * gen.response_mask for x in out)

    def _reference_logits(self, inputs: dict) -> torch.Tensor:
        args = (inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], inputs["start"])
        if self.reference is not None:
            return response_logits(self.reference, *args)
        with adapters_disabled(self.unwrapped.policy):
            return response_logits(self.unwrapped.policy, *args)

    def _shape_scores(self, raw: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """Normalise, clip, then penalise responses without a stop token (in normalised units)."""
        cfg, scores = self.cfg, raw.float()
        if cfg.score_norm:
            scores = masked_whiten(scores, torch.ones_like(scores), all_reduce=self.all_reduce)
        if cfg.score_clip is not None:
            scores = scores.clamp(-cfg.score_clip, cfg.score_clip)
        if cfg.missing_eos_penalty is not None:
            scores = torch.where(stopped, scores, scores - cfg.missing_eos_penalty)
        return scores

    def _rollout_stats(self, gen, raw, scores, logprobs, ref_logprobs, kl, rewards, values, adv, returns) -> _Sums:
        mask, rows = gen.response_mask, gen.response.shape[0]
        s = _Sums()
        s.add("score", raw.sum(), rows)
        s.add("reward", rewards.sum(), rows)  # score - beta * KL, as optimised
        s.add("kl", masked_sum(logprobs - ref_logprobs, mask), rows)  # k1 summed over each sequence
        s.add("response_length", mask.sum(), rows)
        s.add("stop_fraction", gen.stopped.sum(), rows)
        mean, var, count = masked_moments(adv, mask, self.all_reduce)
        # Explained variance of the values: 1 - Var(returns - values) / Var(returns), over tokens.
        _, var_err, _ = masked_moments(returns - values, mask, self.all_reduce)
        _, var_ret, _ = masked_moments(returns, mask, self.all_reduce)
        s.fixed = {"advantage_mean": float(mean), "advantage_std": float(var.sqrt())}
        if self.cfg.has_critic:
            s.fixed["value_explained_variance"] = float(1 - var_err / var_ret.clamp(min=1e-12))
        return s

    # ------------------------------------------------------------ update

    def learn(self, exp: Experience, stats: _Sums) -> None:
        """K epochs over the rollout, each cut into M shuffled minibatches: one optimizer step each."""
        cfg, rows = self.cfg, exp.gen.query.shape[0]
        size = rows // cfg.minibatches
        if size * cfg.minibatches != rows or size % self.micro:
            raise ValueError(f"{rows} rollout rows per process do not split into {cfg.minibatches} minibatches "
                             f"of whole micro-batches of {self.micro}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.updates_done * 1009 + self.acc.process_index)
        # from_pretrained returns eval mode, and transformers checkpoints activations only in train
        # mode: the update's forwards set it explicitly (dropout is off, so the ratio still starts at 1).
        self.model.train()
        for _ in range(cfg.epochs):
            order = torch.randperm(rows, generator=gen).to(exp.mask.device)
            for m in range(cfg.minibatches):
                self._minibatch_step(exp, order[m * size:(m + 1) * size], stats)

    def _minibatch_step(self, exp: Experience, rows: torch.Tensor, stats: _Sums) -> None:
        cfg, acc = self.cfg, self.acc
        tokens = exp.mask[rows].sum().double()
        totals = torch.stack([tokens, torch.tensor(float(len(rows)), dtype=torch.float64, device=tokens.device)])
        global_tokens, global_rows = (self.all_reduce(totals) if self.all_reduce else totals).tolist()
        actor_weight = 0.0 if self.updates_done < cfg.critic_warmup_updates else 1.0
        chunks = rows.split(self.micro)
        for i, idx in enumerate(chunks):
            mask = exp.mask[idx]
            # DDP all-reduces gradients on the minibatch's last micro-batch only.
            with contextlib.nullcontext() if i == len(chunks) - 1 else acc.no_sync(self.model):
                loss, logged = self._micro_loss(exp, idx, actor_weight, global_tokens, global_rows)
                acc.backward(loss * acc.num_processes / global_tokens)
            n = mask.sum()
            for name, value in logged.items():
                stats.add(name, value, n)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or float("inf"))
        if self.guard is not None and not self.guard.step_is_finite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)  # the weights, optimizer and schedule do not move
            self.skipped_steps += 1
            self.guard.check_limit(self.updates_done + 1, rows.tolist(), self.optimizer.param_groups[0]["lr"], "")
            return
        if actor_weight == 0.0:
            for p in self.actor_params:  # no grad: AdamW leaves them (and their moments) untouched
                p.grad = None
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats.add("grad_norm", grad_norm, 1)

    def _micro_loss(self, exp: Experience, idx: torch.Tensor, actor_weight: float, global_tokens: float,
                    global_rows: float) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss as a sum over its tokens (divided by the minibatch's token count by
        the caller), and the sums to log."""
        cfg, temperature, mask = self.cfg, self.sampling.temperature, exp.mask[idx]
        weight = None
        if cfg.loss_norm != "token_mean":
            weight = token_weights(mask, cfg.loss_norm, global_tokens, global_rows, self.sampling.max_new_tokens)
        logits, values = self.model(**exp.inputs(idx))
        logprobs = gather_logprobs(logits, exp.gen.response[idx], temperature)
        pol = clipped_policy_loss(logprobs, exp.logprobs[idx], exp.advantages[idx], mask, cfg.clip,
                                  **({} if weight is None else {"weight": weight}))
        with torch.set_grad_enabled(cfg.entropy_coef > 0):
            entropy = masked_sum(entropy_from_logits(logits, temperature), mask)
        # actor_weight 0 (critic warm-up) keeps the policy in the graph, so DDP sees every parameter.
        loss = actor_weight * pol.loss_sum - cfg.entropy_coef * entropy
        logged = {"policy_loss": pol.loss_sum, "entropy": entropy, "policy_clipfrac": pol.clipped,
                  "ratio": pol.ratio_sum, "approx_kl": pol.approx_kl_sum}
        if values is not None:
            val = clipped_value_loss(values, exp.values[idx], exp.returns[idx], mask, cfg.value_clip)
            loss = loss + cfg.value_coef * val.loss_sum
            logged |= {"value_loss": val.loss_sum, "value_clipfrac": val.clipped}
        if cfg.kl_term == "loss":
            # k3 of the current policy against the (fixed) reference, with its gradient (GRPO);
            # k1's gradient is zero in expectation, so the loss term always uses k3.
            kl = kl_penalty(logprobs, exp.ref_logprobs[idx], "k3")
            kl_sum = masked_sum(kl if weight is None else kl * weight, mask)
            loss = loss + self.kl_ctl.beta * kl_sum
            logged["kl_loss"] = kl_sum
        return loss, logged

    def step(self, prompts: list[list[int]], score_fn: ScoreFn) -> tuple[dict, Experience]:
        """One PPO update; returns (statistics averaged over all processes, this process's experience)."""
        start = time.perf_counter()
        beta = self.kl_ctl.beta
        exp, stats = self.rollout(prompts, score_fn)
        self.learn(exp, stats)
        record = stats.means(self.all_reduce)
        if self.skipped_steps:
            record["skipped_steps"] = self.skipped_steps
        record |= {"beta": beta, "lr": self.optimizer.param_groups[0]["lr"], "update_s": time.perf_counter() - start}
        self.kl_ctl.update(record["kl"], len(prompts) * self.acc.num_processes)
        self.updates_done += 1
        return record, exp


# ================================================================ recipes: the loop around PPO


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out, run, cfg, n = Path(recipe.run.output_dir), recipe.run, recipe.trainer.ppo, recipe.trainer.sampling.n
    engine.start_process()  # this rank's device before any weight
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=engine.resolve_precision(recipe),
                              log_with=run.report_to or None,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    p = prepare(recipe, resume_from, accelerator.num_processes)
    ppo, stream, updates = _build(recipe, p, accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_recipe(recipe, out / "recipe.yaml")
        checkpoint.remove_partial_checkpoints(out)
    if resume_from is not None:
        _resume(ppo, resume_from)
    if run.report_to:
        accelerator.init_trackers(out.name, config=engine._flat_config(recipe))
    logger = MetricsLogger(out, updates, ppo.updates_done, accelerator, title="ppo")
    held_out = lambda: evaluate(ppo.unwrapped.policy, p, recipe, ppo.all_reduce, accelerator)  # noqa: E731
    stop = StopSignal()
    try:
        if p.eval_prompts and ppo.updates_done == 0:
            logger.log({"step": 0, **held_out()})
        while ppo.updates_done < updates:
            # A prompt's n samples are consecutive rows: grpo / rloo read them as one group.
            rows = [i for i in stream.indices(ppo.updates_done) for _ in range(n)]
            scorer = ChatScorer(p, [p.prompts[i] for i in rows])
            record, exp = ppo.step([p.prompt_ids[i] for i in rows], scorer)
            step = ppo.updates_done
            logger.log({"step": step, "epoch": round(step / stream.per_epoch, 4), **record})
            if accelerator.is_main_process and cfg.samples_logged and (step % cfg.sample_every == 0 or step == 1):
                write_samples(out / "samples.jsonl", step, scorer, exp, cfg.samples_logged)
            if p.eval_prompts and ((run.eval_every and step % run.eval_every == 0) or step == updates):
                logger.log({"step": step, **held_out()})
            if run.save_every and step % run.save_every == 0 and step < updates:
                _save(ppo, out, run.keep_last, p.tokenizer)
            if stop.should_stop(accelerator):
                path = checkpoint.checkpoint_dir(out) / f"step-{step}"
                path = path if path.is_dir() else _save(ppo, out, run.keep_last, p.tokenizer)
                raise Preempted(f"preempted by {stop.name} after update {step}: checkpoint {path} written; "
                                "rerun the same command to resume")
        final = engine.save_final(accelerator, ppo.model, p.tokenizer, out)
    except BaseException:
        engine.release_accelerator()
        raise
    finally:
        stop.close()
        logger.close()
    accelerator.end_training()
    engine.release_accelerator()
    return final


def _build(recipe: Recipe, p: Prepared, accelerator) -> tuple[PPO, engine.MicroBatchStream, int]:
    """Models, optimizer, schedule and the prompt stream (each process takes its slice of every update)."""
    from finetune.rl.ppo_models import build_models

    run, cfg, world = recipe.run, recipe.trainer.ppo, accelerator.num_processes
    models = build_models(recipe, p.tokenizer)
    for line in plan(recipe, p, models.info).lines(recipe, world):
        info(line, accelerator)
    lay = Layout.of(recipe, world)
    updates = lay.updates(recipe, len(p.prompts), world)
    stream = engine.MicroBatchStream(len(p.prompts), lay.prompts_per_process, world, accelerator.process_index,
                                     run.seed, recipe.data.shuffle)
    optimizer = engine.build_optimizer(recipe, models.actor_critic)
    if cfg.critic_lr is not None:
        _set_critic_lr(optimizer, models.actor_critic, cfg.critic_lr)
    scheduler = engine.build_scheduler(recipe, optimizer, updates * cfg.epochs * cfg.minibatches)
    if models.reference is not None:
        models.reference.to(accelerator.device)
    ppo = PPO(models.actor_critic, optimizer, cfg, recipe.trainer.sampling, accelerator=accelerator,
              micro_batch_size=run.micro_batch_size, stop_ids=p.stop_ids, pad_id=p.tokenizer.pad_token_id,
              scheduler=scheduler, reference=models.reference, max_grad_norm=recipe.optim.max_grad_norm,
              seed=run.seed, guard=NumericGuard(run.max_skipped_steps, engine.resolve_precision(recipe) == "fp16"))
    return ppo, stream, updates


def _set_critic_lr(optimizer, model: ActorCritic, lr: float) -> None:
    """Each parameter group split in two, the critic's half with its own learning rate: a fresh
    value head at the policy's small learning rate takes hundreds of steps to fit the returns."""
    critic = {id(p) for n, p in model.named_parameters() if n in model.critic_parameter_names()}
    groups = []
    for group in optimizer.param_groups:
        for mine in (False, True):
            params = [p for p in group["params"] if (id(p) in critic) == mine]
            if params:
                groups.append({**group, "params": params, "lr": lr if mine else group["lr"]})
    optimizer.param_groups = groups


def _save(ppo: PPO, out: Path, keep_last: int, tokenizer) -> Path:
    state = {"step": ppo.updates_done, "beta": ppo.kl_ctl.beta, "skipped_steps": ppo.skipped_steps,
             "num_processes": ppo.acc.num_processes}
    return checkpoint.save_checkpoint(ppo.acc, out, ppo.updates_done, ppo.model, ppo.optimizer, ppo.scheduler,
                                      state, keep_last, tokenizer)


def _resume(ppo: PPO, path: Path) -> None:
    # load_checkpoint refuses another process count, then restores the policy (full weights or
    # adapter), optimizer, schedule and RNG; the critic sits beside the policy in model/critic/.
    state = checkpoint.load_checkpoint(ppo.acc, path, ppo.unwrapped.policy, ppo.optimizer, ppo.scheduler)
    ppo.unwrapped.load_critic(path / "model")
    ppo.updates_done, ppo.kl_ctl.beta, ppo.skipped_steps = state["step"], state["beta"], state["skipped_steps"]
    info(f"resumed from {path} at update {state['step']}", ppo.acc)
