"""Which scored samples rejection-sampling SFT keeps, and what a round of samples looks like.

Pure functions over `ScoredSample` records (no torch), so every rule is tested on hand-made data.

`select_samples` decides per prompt, in this order:
1. truncated samples (no stop token) are never kept: they teach the model not to stop; nor
   are empty ones;
2. duplicates (same text, or same text once whitespace is collapsed) keep their first occurrence;
3. rules: `best_of_n` the highest reward; `top_k` the k highest; `threshold` every sample with
   reward >= threshold; `all_correct` samples with reward >= threshold, at most max_per_prompt.
   `min_reward` further bars best_of_n / top_k picks below it (with a 0/1 verifier, best-of-n of
   eight wrong answers is still wrong). Ties go to the earlier sample, so selection is
   deterministic.
Every sample gets a `reason`: kept, truncated, empty, duplicate, below_threshold, not_selected.

`round_stats` summarises a round: acceptance, reward spread (the max - median gap per prompt is
the gain best-of-n can bring), truncation, response length and distinct-n among each prompt's
samples (entropy collapse shows there first). `preference_pairs` turns scored samples into
chosen/rejected pairs for a reward model.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from finetune.recipe.schema import RejectionCfg

REASONS = ("kept", "truncated", "empty", "duplicate", "below_threshold", "not_selected")


@dataclass
class ScoredSample:
    prompt_index: int
    sample_index: int
    text: str
    reward: float
    stopped: bool
    token_ids: list[int] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)  # reward components, unweighted
    kept: bool = False
    reason: str = ""


    def to_row(self, prompt: list[dict]) -> dict:
        """One line of samples.jsonl."""
        return {"prompt_index": self.prompt_index, "sample_index": self.sample_index, "prompt": prompt,
                "completion": self.text, "reward": self.reward, "rewards": self.parts, "stopped": self.stopped,
                "kept": self.kept, "reason": self.reason, "completion_ids": self.token_ids}

    @classmethod
    def from_row(cls, row: dict) -> ScoredSample:
        return cls(row["prompt_index"], row["sample_index"], row["completion"], row["reward"], row["stopped"],
                   row["completion_ids"], row["rewards"], row["kept"], row["reason"])


@dataclass
class SelectionRule:
    select: str = "best_of_n"  # best_of_n | top_k | threshold | all_correct
    k: int = 1
    threshold: float = 1.0
    max_per_prompt: int = 1
    min_reward: float | None = None
    dedupe: str = "whitespace"  # exact | whitespace | none

    @classmethod
    def from_recipe(cls, cfg: RejectionCfg) -> SelectionRule:
        return cls(cfg.select, cfg.k, cfg.threshold, cfg.max_per_prompt, cfg.min_reward, cfg.dedupe)

    def floor(self) -> float | None:
        """The least reward a sample may have to be kept (None: no floor)."""
        return self.threshold if self.select in ("threshold", "all_correct") else self.min_reward

    def quota(self) -> int | None:
        """How many samples per prompt may be kept (None: all that pass the floor)."""
        return {"best_of_n": 1, "top_k": self.k, "threshold": None, "all_correct": self.max_per_prompt}[self.select]


def dedupe_key(text: str, mode: str) -> str | None:
    """Texts with equal keys are duplicates; None: never a duplicate."""
    if mode == "none":
        return None
    return " ".join(text.split()) if mode == "whitespace" else text


def group_by_prompt(samples: list[ScoredSample]) -> dict[int, list[ScoredSample]]:
    groups: dict[int, list[ScoredSample]] = {}
    for s in samples:
        groups.setdefault(s.prompt_index, []).append(s)
    return groups


def select_samples(samples: list[ScoredSample], rule: SelectionRule) -> list[ScoredSample]:
    """Sets `kept` and `reason` on every sample (in place) and returns the kept ones."""
    for group in group_by_prompt(samples).values():
        _select_prompt(sorted(group, key=lambda s: s.sample_index), rule)
    return [s for s in samples if s.kept]


def _select_prompt(group: list[ScoredSample], rule: SelectionRule) -> None:
    seen: set[str] = set()
    candidates = []
    for s in group:
        s.kept = False
        key = dedupe_key(s.text, rule.dedupe)
        if not s.stopped:
            s.reason = "truncated"
        elif not s.text.strip():
            s.reason = "empty"
        elif key is not None and key in seen:
            s.reason = "duplicate"
        elif rule.floor() is not None and s.reward < rule.floor():
            s.reason = "below_threshold"
        else:
            candidates.append(s)
        if s.stopped and key is not None:
            seen.add(key)
    ranked = sorted(candidates, key=lambda s: (-s.reward, s.sample_index))
    quota = rule.quota()
    for rank, s in enumerate(ranked):
        s.kept = quota is None or rank < quota
        s.reason = "kept" if s.kept else "not_selected"


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over the sequences (1.0: no repetition; 0 when none)."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def round_stats(samples: list[ScoredSample]) -> dict:
    """A round's numbers: averages over prompts of per-prompt statistics of their n samples."""
    groups = list(group_by_prompt(samples).values())
    if not groups:
        return {}
    per_prompt = lambda f: sum(f(g) for g in groups) / len(groups)  # noqa: E731
    rewards = lambda g: [s.reward for s in g]  # noqa: E731
    return {
        "samples": len(samples),
        "kept": sum(s.kept for s in samples),
        "acceptance_rate": sum(s.kept for s in samples) / len(samples),
        "prompts_with_kept": sum(any(s.kept for s in g) for g in groups) / len(groups),
        "reward_max": per_prompt(lambda g: max(rewards(g))),
        "reward_median": per_prompt(lambda g: statistics.median(rewards(g))),
        "reward_mean": per_prompt(lambda g: statistics.fmean(rewards(g))),
        "truncated_rate": sum(not s.stopped for s in samples) / len(samples),
        "length_mean": statistics.fmean(len(s.token_ids) for s in samples),
        "distinct_1": per_prompt(lambda g: distinct_n([s.token_ids for s in g], 1)),
        "distinct_2": per_prompt(lambda g: distinct_n([s.token_ids for s in g], 2)),
    }


@dataclass
class PreferencePairRecord:
    prompt_index: int
    chosen: str
    rejected: str
    margin: float  # reward(chosen) - reward(rejected) > 0


def preference_pairs(samples: list[ScoredSample]) -> list[PreferencePairRecord]:
    """Per prompt, its best and its worst stopped sample when their rewards differ."""
    pairs = []
    for index, group in group_by_prompt(samples).items():
        done = sorted((s for s in group if s.stopped), key=lambda s: (-s.reward, s.sample_index))
        if len(done) >= 2 and done[0].reward > done[-1].reward:
            pairs.append(PreferencePairRecord(index, done[0].text, done[-1].text, done[0].reward - done[-1].reward))
    return pairs
