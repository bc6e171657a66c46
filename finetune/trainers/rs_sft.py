"""Rejection-sampling SFT (`trainer.type: rs_sft`): fine-tune on the policy's own best samples.

Algorithm (Llama 2's rejection-sampling stage, RAFT, ReST-EM), per round r = 1..R:
  1. sample trainer.sampling.n completions of every training prompt from the current policy
     (round r-1's model; model.name in round 1) — finetune.rl.rollout;
  2. score them with trainer.rewards (verifiers, a user function, a reward model);
  3. keep by rejection.select (best_of_n, top_k, threshold, all_correct), never a truncated
     sample, with dedupe — finetune.rl.selection; rounds/round-r/samples.jsonl lists every sample with
     its reward, kept flag and reason (pairs.jsonl: best-vs-worst pairs for a reward model);
  4. SFT on the shared engine into rounds/round-r/ on the kept samples of all rounds so far
     (keep: accumulate; Llama 2 regressed training on the last round only) or of this round
     (latest), plus rejection.sft_data, from round r-1's weights or from model.name again
     (restart: base, as ReST-EM, to limit overfitting to the policy's own samples);
  5. score greedy pass@1 and sampled pass@n on held-out prompts (rejection.eval_rewards).
<output_dir>/metrics.jsonl gets one record per round (round 0: the start model); final/ is the
last trained round's model. Departures: only the sampled reply is trained (last_assistant); a
round that keeps nothing ends the run with the previous round's model (round 1: an error). Runs
resume per round: finished rounds are read back, an unfinished round's SFT resumes from its
newest checkpoint (run.save_every).

    finetune run recipes/rs_sft.yaml
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune.console import info
from finetune.data.formats import to_conversation
from finetune.data.sources import encode_conversations, mix_sources, split_holdout, with_format
from finetune.data.tokenizer_setup import load_tokenizer
from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import DataSource, Recipe
from finetune.rl.rewards import Rewards, build_rewards
from finetune.rl.rollout import encode_prompt, sample_completions
from finetune.rl.rounds import publish, read_jsonl, round_dir, start_run_dir, write_jsonl
from finetune.rl.selection import ScoredSample, SelectionRule, dedupe_key, preference_pairs, round_stats, select_samples
from finetune.train import checkpoint, engine
from finetune.train.metrics import MetricsLogger
from finetune.train.plan import Plan


@dataclass
class Prepared:
    tokenizer: object
    prompts: list  # Conversations of format `prompts` (extra holds the verifiers' columns)
    eval_prompts: list
    rewards: Rewards
    eval_rewards: Rewards
    sft_conversations: list  # rejection.sft_data, mixed into every round
    notes: list[str]


def read_prompts(sources: list[DataSource], key: str, seed: int) -> list:
    sources = [with_format(src, f"{key}.{i}.path", expected="prompts") for i, src in enumerate(sources)]
    for i, src in enumerate(sources):
        if src.format != "prompts":
            raise DataError(f"{key}.{i}.format: rs_sft samples completions of format 'prompts' rows "
                            f"(a prompt column, plus the columns its verifiers read), got {src.format!r}")
    return mix_sources(sources, key, seed, to_conversation)


def prepare(recipe: Recipe, resume_from: Path | None = None) -> Prepared:
    """Tokenizer, prompts, rewards and their checks. Loads no policy weights."""
    if recipe.model.name is None:
        raise RecipeError("model.name: rs_sft starts from a trained chat model (model.init_config is not supported)")
    notes: list[str] = []
    tokenizer = load_tokenizer(recipe, notes=notes)
    seed, rej = recipe.run.seed, recipe.trainer.rejection
    prompts = read_prompts(recipe.data.train, "data.train", seed)
    evals = read_prompts(recipe.data.eval, "data.eval", seed) if recipe.data.eval else []
    if recipe.data.eval_fraction:
        prompts, evals = split_holdout(prompts, recipe.data.eval_fraction, seed)
    sizes = dict(max_length=recipe.tokenizer.max_length, batch_size=recipe.trainer.sampling.batch_size)
    rewards = build_rewards(recipe.trainer.rewards, "trainer.rewards", **sizes)
    eval_rewards = (build_rewards(rej.eval_rewards, "trainer.rejection.eval_rewards", **sizes)
                    if rej.eval_rewards else rewards)
    rewards.check_rows(prompts, "data.train")
    eval_rewards.check_rows(evals, "data.eval")
    rewards.check_tokenizer(tokenizer)
    eval_rewards.check_tokenizer(tokenizer)
    sft = mix_sources(rej.sft_data, "trainer.rejection.sft_data", seed, to_conversation) if rej.sft_data else []
    if not evals:
        notes.append("no held-out prompts (data.eval / data.eval_fraction): pass@1 is not measured")
    return Prepared(tokenizer, prompts, evals, rewards, eval_rewards, sft, notes)


def plan(recipe: Recipe, prepared: Prepared | None = None, model_info=None) -> Plan:
    from finetune.models.loading import count_params_meta

    prepared = prepared or prepare(recipe)
    total, trainable = count_params_meta(recipe, prepared.tokenizer)
    rej, s = recipe.trainer.rejection, recipe.trainer.sampling
    tokens = sum(len(encode_prompt(prepared.tokenizer, c.messages)) for c in prepared.prompts)
    notes = [f"{rej.rounds} rounds x {len(prepared.prompts)} prompts x {s.n} samples (temperature "
             f"{s.temperature:g}, top_p {s.top_p:g}, top_k {s.top_k}); rewards: {', '.join(prepared.rewards.names)}",
             f"select {rej.select}, keep {rej.keep}, restart from {rej.restart}; each round's SFT steps "
             f"follow from its kept samples (run.epochs / run.max_steps apply per round)"]
    return Plan("rs_sft", recipe.model.name, total, trainable, len(prepared.prompts), tokens,
                len(prepared.eval_prompts), unit="prompts", notes=prepared.notes + notes)


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    engine.start_process()  # this rank's device before any weight
    prepared = prepare(recipe)
    out = Path(recipe.run.output_dir)
    main = engine.start_process().is_main_process
    if main:
        start_run_dir(recipe, out)
    for line in plan(recipe, prepared).lines(recipe, num_processes):
        info(line)
    logger = MetricsLogger(out, recipe.trainer.rejection.rounds, 0, title="rs_sft") if main else None
    try:
        last = RoundRunner(recipe, prepared, out, logger).run()
    finally:
        if logger is not None:
            logger.close()
    if main:
        publish(last, out / "final")
    engine.start_process().wait_for_everyone()
    return out / "final"


def round_recipe(recipe: Recipe, r: int, init: Path | None, samples_file: Path) -> Recipe:
    """The round's SFT recipe (written to rounds/round-r/recipe.yaml by the engine)."""
    rr = recipe.model_copy(deep=True)
    rr.trainer.type = "sft"
    rr.data.train = [DataSource(path=str(samples_file), format="messages"), *(recipe.trainer.rejection.sft_data or [])]
    rr.data.eval = None
    rr.data.eval_fraction = None
    rr.run.output_dir = str(round_dir(Path(recipe.run.output_dir), r))
    rr.run.eval_at_start = False
    rr.run.sample_prompts = []
    if recipe.adapter is None and init is not None:  # full weights: the round starts from init's
        rr.model.name, rr.model.revision = str(init), None
    return rr


def load_policy(recipe: Recipe, tokenizer, weights: Path | None):
    """model.name (weights None) or a round's final/: a full model, or base + that round's adapter."""
    from finetune.models.loading import load_model

    source = recipe
    if recipe.adapter is None and weights is not None:
        source = recipe.model_copy(deep=True)
        source.model.name, source.model.revision = str(weights), None
    model, _ = load_model(source, tokenizer)
    if recipe.adapter is not None and weights is not None:
        checkpoint.load_weights(model, weights)  # the adapter trained so far, on a fresh one
    if getattr(model, "hf_device_map", None) is None:  # quantized models are placed when loaded
        model.to(engine.start_process().device)
    return model


def nothing_kept(samples: list[ScoredSample], rule: SelectionRule) -> str:
    """Why a round kept no sample, in one line."""
    done = [s for s in samples if s.stopped]
    if not done:
        return "every sample was truncated (no stop token within trainer.sampling.max_new_tokens)"
    best = max(s.reward for s in done)
    return f"no sample reached {rule.select}'s minimum reward {rule.floor():g} (best: {best:g})"


class RoundRunner:
    """The rounds of one run, and the policy model currently in memory (loaded once per round:
    it samples, then trains when the round continues from it)."""

    def __init__(self, recipe: Recipe, prepared: Prepared, out: Path, logger: MetricsLogger | None) -> None:
        self.recipe, self.p, self.out, self.logger = recipe, prepared, out, logger
        self.rej = recipe.trainer.rejection
        self.rule = SelectionRule.from_recipe(self.rej)
        self.state = engine.start_process()
        self._model, self._weights = None, "nothing loaded"

    def run(self) -> Path:
        self.baseline()
        last = None
        for r in range(1, self.rej.rounds + 1):
            final = self.run_round(r, last)
            if final is None:
                break
            last = final
        self.release()
        if last is None:  # a rerun of a run whose first round kept nothing
            raise DataError(f"rs_sft: round 1 kept no sample; nothing to train on (see "
                            f"{round_dir(self.out, 1) / 'samples.jsonl'})")
        return last

    # ------------------------------------------------------------ the policy in memory

    def policy(self, weights: Path | None):
        if self._model is None or self._weights != weights:
            self.release()
            self._model = load_policy(self.recipe, self.p.tokenizer, weights)
            self._weights = weights
        return self._model

    def release(self) -> None:
        self._model, self._weights = None, "nothing loaded"
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------ rounds

    def baseline(self) -> None:
        """Round 0: the start model's held-out pass@1 / pass@n, the number later rounds must beat."""
        rdir = round_dir(self.out, 0)
        if (rdir / "round.json").is_file() or not self.p.eval_prompts:
            return
        start = time.perf_counter()
        record = {"round": 0, "step": 0, **self.evaluate(self.policy(None), 0)}
        self.finish(rdir, record | {"eval_s": time.perf_counter() - start})

    def run_round(self, r: int, prev: Path | None) -> Path | None:
        """One round; returns its final/ (None: it kept nothing and the run ends)."""
        rdir = round_dir(self.out, r)
        if (rdir / "round.json").is_file():
            info(f"round {r}: finished earlier, read back from {rdir}")
            return rdir / "final" if (rdir / "final").is_dir() else None
        t0 = time.perf_counter()
        samples = self.collect(r, prev)
        record = {"round": r, "step": r, **round_stats(samples), "sample_s": time.perf_counter() - t0}
        if record["kept"] == 0:
            why = nothing_kept(samples, self.rule)
            self.finish(rdir, record | {"stopped": why})
            if r == 1:
                raise DataError(f"rs_sft round 1: {why}; nothing to train on (all samples are in "
                                f"{rdir / 'samples.jsonl'})")
            info(f"[yellow]round {r}: {why}; stopping with round {r - 1}'s model[/]")
            return None
        t1 = time.perf_counter()
        final = self.sft(r, prev, samples)
        record |= self.sft_summary(rdir) | {"train_s": time.perf_counter() - t1}
        t2 = time.perf_counter()
        record |= self.evaluate(self.policy(final), r) | {"eval_s": time.perf_counter() - t2}
        self.finish(rdir, record)
        return final

    def finish(self, rdir: Path, record: dict) -> None:
        """round.json marks the round done; it is written last."""
        if self.state.is_main_process:
            rdir.mkdir(parents=True, exist_ok=True)
            (rdir / "round.json").write_text(json.dumps(record, indent=1))
            self.logger.log(record)
        self.state.wait_for_everyone()

    # ------------------------------------------------------------ sample -> score -> select

    def sample_and_score(self, model, prompts: list, rewards: Rewards, seed: int,
                         greedy: bool = False) -> list[ScoredSample]:
        """Every prompt's samples, scored; each process samples its share of the prompts."""
        from accelerate.utils import gather_object

        from finetune.models.loading import run_half_dtype

        world, rank = self.state.num_processes, self.state.process_index
        mine = list(range(rank, len(prompts), world))
        torch.manual_seed(seed * 1009 + rank)
        # In the run's autocast, as its SFT computes: fp32 master weights would otherwise sample in
        # fp32 on a GPU (several times slower than bf16). On the CPU `auto` is fp32: no autocast.
        half = run_half_dtype(self.recipe)
        device = next(model.parameters()).device
        with torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext():
            rollouts = sample_completions(model, self.p.tokenizer, [prompts[i].messages for i in mine],
                                          self.recipe.trainer.sampling, greedy=greedy)
        scores = rewards([x.prompt for x in rollouts], [x.text for x in rollouts],
                         [prompts[mine[x.prompt_index]].extra for x in rollouts])
        samples = [ScoredSample(mine[x.prompt_index], x.sample_index, x.text, scores.total[k], x.stopped,
                                x.completion_ids, {name: v[k] for name, v in scores.parts.items()})
                   for k, x in enumerate(rollouts)]
        if world > 1:
            samples = sorted(gather_object(samples), key=lambda s: (s.prompt_index, s.sample_index))
        return samples

    def collect(self, r: int, prev: Path | None) -> list[ScoredSample]:
        """The round's scored and selected samples; read back when the round was begun before."""
        rdir = round_dir(self.out, r)
        path = rdir / "samples.jsonl"
        if path.is_file():
            return [ScoredSample.from_row(row) for row in read_jsonl(path)]
        samples = self.sample_and_score(self.policy(prev), self.p.prompts, self.p.rewards,
                                        self.recipe.run.seed + r)
        select_samples(samples, self.rule)
        if self.state.is_main_process:
            rdir.mkdir(parents=True, exist_ok=True)
            prompt = lambda i: self.p.prompts[i].messages  # noqa: E731
            write_jsonl(rdir / "pairs.jsonl", [
                {"prompt": prompt(x.prompt_index), "chosen": x.chosen, "rejected": x.rejected, "margin": x.margin}
                for x in preference_pairs(samples)])
            write_jsonl(path, [s.to_row(prompt(s.prompt_index)) for s in samples])  # last: marks done
        self.state.wait_for_everyone()
        return samples

    def training_rows(self, r: int, samples: list[ScoredSample]) -> list[dict]:
        """Kept samples of rounds 1..r (accumulate) or of round r (latest) as conversations,
        each (prompt, text) once."""
        rows, seen = [], set()
        for q in range(1, r + 1) if self.rej.keep == "accumulate" else [r]:
            round_samples = samples if q == r else [
                ScoredSample.from_row(x) for x in read_jsonl(round_dir(self.out, q) / "samples.jsonl")]
            for s in round_samples:
                key = (s.prompt_index, dedupe_key(s.text, self.rule.dedupe) or f"{q}/{s.sample_index}")
                if not s.kept or key in seen:
                    continue
                seen.add(key)
                messages = self.p.prompts[s.prompt_index].messages + [{"role": "assistant", "content": s.text}]
                rows.append({"messages": messages, "round": q, "reward": s.reward})
        return rows

    # ------------------------------------------------------------ SFT and eval

    def sft(self, r: int, prev: Path | None, samples: list[ScoredSample]) -> Path:
        from finetune.train.attention import enable_packed_attention
        from finetune.trainers.sft import make_collate

        rdir = round_dir(self.out, r)
        if (rdir / "final").is_dir():  # trained before an interruption
            return rdir / "final"
        init = prev if self.rej.restart == "previous" else None
        samples_file = rdir / "sft_train.jsonl"
        if self.state.is_main_process and not samples_file.is_file():
            write_jsonl(samples_file, self.training_rows(r, samples))
        self.state.wait_for_everyone()
        rr = round_recipe(self.recipe, r, init, samples_file)
        units = self.encode_round(rr)
        model = self.policy(init)
        if rr.data.packing or rr.data.padding_free:
            enable_packed_attention(model)
        task = engine.SupervisedTask(model=model, tokenizer=self.p.tokenizer, train_units=units,
                                     collate=make_collate(rr, self.p.tokenizer.pad_token_id))
        resume = checkpoint.latest_checkpoint(rdir)
        if resume is None and self.state.is_main_process:
            (rdir / "metrics.jsonl").unlink(missing_ok=True)  # a restarted round logs from step 1
        info(f"round {r}: SFT on {len(units)} units from {init or self.recipe.model.name}")
        engine.train(rr, task, resume_from=resume)
        self.release()  # trained in place and wrapped by accelerate: the next use reloads final/
        return rdir / "final"

    def encode_round(self, rr: Recipe) -> list:
        from finetune.trainers.sft import pack

        t, seed = rr.tokenizer, rr.run.seed
        encode = lambda convs, train_on, key: encode_conversations(  # noqa: E731
            self.p.tokenizer, convs, train_on, t.max_length, t.overflow, key)[0]
        # Only the sampled reply is trained: earlier assistant turns of a prompt are context.
        units = encode(mix_sources(rr.data.train[:1], "data.train", seed, to_conversation), "last_assistant",
                       rr.data.train[0].path)
        if self.p.sft_conversations:
            units += encode(self.p.sft_conversations, rr.trainer.train_on, "trainer.rejection.sft_data")
        if rr.data.packing:
            units, _ = pack(units, t.max_length)
        world = self.state.num_processes
        if len(units) < rr.run.micro_batch_size * world:  # few kept samples: still one step
            rr.run.micro_batch_size = max(1, len(units) // world)
            info(f"note: only {len(units)} units this round; run.micro_batch_size {rr.run.micro_batch_size}")
        return units

    def sft_summary(self, rdir: Path) -> dict:
        path = rdir / "metrics.jsonl"
        logged = [x for x in read_jsonl(path) if "loss" in x] if path.is_file() else []
        rows = read_jsonl(rdir / "sft_train.jsonl")
        return {"sft_samples": len(rows), "sft_steps": logged[-1]["step"] if logged else 0,
                "sft_loss": logged[-1]["loss"] if logged else None}

    def evaluate(self, model, r: int) -> dict:
        """Held-out greedy pass@1 and sampled pass@n (a completion passes when it stopped and its
        eval reward is >= rejection.pass_threshold)."""
        prompts = self.p.eval_prompts
        if not prompts:
            return {}
        seed = self.recipe.run.seed + 100_000 + r
        passed = lambda s: s.stopped and s.reward >= self.rej.pass_threshold  # noqa: E731
        greedy = self.sample_and_score(model, prompts, self.p.eval_rewards, seed, greedy=True)
        sampled = self.sample_and_score(model, prompts, self.p.eval_rewards, seed)
        by_prompt: dict[int, bool] = {}
        for s in sampled:
            by_prompt[s.prompt_index] = by_prompt.get(s.prompt_index, False) or passed(s)
        return {"eval_pass@1": sum(map(passed, greedy)) / len(greedy),
                "eval_pass@n": sum(by_prompt.values()) / len(by_prompt),
                "eval_reward": sum(s.reward for s in greedy) / len(greedy),
                "eval_length": sum(len(s.token_ids) for s in greedy) / len(greedy),
                "n": self.recipe.trainer.sampling.n}
