"""Rewards for sampled completions: programmatic verifiers, user functions and reward models.

`build_rewards(recipe.trainer.rewards)` turns the recipe's list into one `Rewards`: the weighted
sum of its components. Every component is called the same way a user function is:

    fn(prompts, completions, **columns) -> list[float]

with `prompts` the prompt message lists, `completions` the completion strings and `columns` the
prompt rows' other columns (e.g. `answer=[...]`), one value per completion.

Built-in verifiers score 1.0 when satisfied, else 0.0:
- `exact_match`: the completion equals the row's `column` (default `answer`) after normalisation
  (whitespace collapsed, case folded, a trailing full stop dropped).
- `numeric`: the LAST number in the completion equals the `column` value as a number (relative
  tolerance 1e-6). The final number is the answer by convention (GSM8K's "#### 12", "so the answer
  is 12"), so "7 + 5 = 12" passes for answer "12" while "7 + 5 = 13" fails.
- `regex`: `re.search(pattern, completion)` finds a match (a format check).
- `length`: min_length <= len(completion) <= max_length, in characters.
- `function`: a user callable named by import path ("mypkg.rewards:score"; the current directory
  is importable); it must return one finite number per completion.
- `model`: a reward model trained by `trainer.type: reward` (finetune.models.reward_model): prompt and
  completion rendered with the reward model's own chat template exactly as in reward training,
  scored in batches at the last real token.

Everything that can be checked before weights are loaded is checked in `build_rewards` and
`Rewards.check_rows` / `check_tokenizer`: import paths, the columns each verifier reads (naming the
row that lacks one), a reward model directory's config, tokenizer and chat template.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import RewardCfg
from finetune.rl.evaluate import normalize_answer

RewardFn = Callable[..., Sequence[float]]
# A number as people write it: optional sign, thousands separators, decimals.
NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?")


@dataclass
class RewardComponent:
    name: str  # "numeric", "function:mypkg.rewards:score", "model:runs/reward/final" ...
    key: str  # the recipe key, for messages: "trainer.rewards.0"
    weight: float
    fn: RewardFn
    column: str | None = None  # the prompt-row column this component reads (checked up front)
    numeric_column: bool = False  # that column must hold a number


@dataclass
class Scores:
    total: list[float]  # weighted sum per completion
    parts: dict[str, list[float]]  # component name -> its unweighted scores


# ---------------------------------------------------------------- built-in verifiers


def parse_number(value) -> float | None:
    """A number from an int, float or numeric string ("1,234", " 12 "); None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value.strip().replace(",", ""))
    return None


def last_number(text: str) -> float | None:
    found = NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numbers_equal(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def exact_match_reward(column: str) -> RewardFn:
    def score(prompts, completions, **columns):
        refs = columns[column]
        return [float(normalize_answer(c) == normalize_answer(str(r))) for c, r in zip(completions, refs, strict=True)]

    return score


def numeric_reward(column: str) -> RewardFn:
    def score(prompts, completions, **columns):
        refs = columns[column]
        return [float(numbers_equal(last_number(c), parse_number(r))) for c, r in zip(completions, refs, strict=True)]

    return score


def regex_reward(pattern: str) -> RewardFn:
    compiled = re.compile(pattern)
    return lambda prompts, completions, **_: [float(compiled.search(c) is not None) for c in completions]


def length_reward(min_length: int | None, max_length: int | None) -> RewardFn:
    lo, hi = min_length or 0, math.inf if max_length is None else max_length
    return lambda prompts, completions, **_: [float(lo <= len(c) <= hi) for c in completions]


def import_function(path: str, key: str) -> RewardFn:
    """The callable at "package.module:attr" (the current directory is importable)."""
    module_name, _, attr = path.partition(":")
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # console scripts do not put the cwd on sys.path
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - a broken user module fails in many ways; one line says which
        raise RecipeError(f"{key}.function: cannot import module {module_name!r}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RecipeError(f"{key}.function: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RecipeError(f"{key}.function: {path!r} is not callable (got {type(obj).__name__})")
    return obj


# ---------------------------------------------------------------- the combination


class Rewards:
    """Weighted sum of reward components: `rewards(prompts, completions, rows)` -> Scores."""

    def __init__(self, components: list[RewardComponent]) -> None:
        self.components = components

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def check_rows(self, conversations: list, key: str) -> None:
        """DataError naming the first prompt row that lacks a column a verifier reads."""
        for comp in self.components:
            if comp.column is None:
                continue
            for conv in conversations:
                if comp.column not in conv.extra:
                    present = ", ".join(sorted(conv.extra)) or "none besides the prompt"
                    raise DataError(f"{conv.origin}: {comp.key} ({comp.name}) reads column {comp.column!r}, "
                                    f"which this {key} row lacks (other columns: {present})")
                if comp.numeric_column and parse_number(conv.extra[comp.column]) is None:
                    raise DataError(f"{conv.origin}: {comp.key} ({comp.name}) compares numbers, but column "
                                    f"{comp.column!r} holds {conv.extra[comp.column]!r}")
        # A function reward is called with every column for every row: a row without one that the
        # other rows have would reach it as None and score silently wrong.
        function = next((c for c in self.components if c.name.startswith("function:")), None)
        if function is not None and conversations:
            every = dict.fromkeys(k for conv in conversations for k in conv.extra)
            for conv in conversations:
                missing = [k for k in every if k not in conv.extra]
                if missing:
                    raise DataError(f"{conv.origin}: {function.key} ({function.name}) is called with column "
                                    f"{missing[0]!r}, which this {key} row lacks while others have it")

    def check_tokenizer(self, tokenizer) -> None:
        """Reward models must render conversations with this run's chat template."""
        for comp in self.components:
            check = getattr(comp.fn, "check_template", None)
            if check is not None:
                check(tokenizer, comp.key)

    def __call__(self, prompts: list[list[dict]], completions: list[str], rows: list[dict]) -> Scores:
        columns = {k: [row.get(k) for row in rows] for k in dict.fromkeys(k for row in rows for k in row)}
        total = [0.0] * len(completions)
        parts: dict[str, list[float]] = {}
        for comp in self.components:
            values = comp.fn(prompts, completions, **columns)
            values = _checked(values, len(completions), comp)
            parts[comp.name] = values
            total = [t + comp.weight * v for t, v in zip(total, values, strict=True)]
        return Scores(total, parts)


def _checked(values, n: int, comp: RewardComponent) -> list[float]:
    """A component's output as n finite floats, or a RecipeError naming the component."""
    what = f"{comp.key} ({comp.name})"
    if hasattr(values, "tolist"):  # a tensor or an ndarray
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise RecipeError(f"{what} returned {type(values).__name__}; expected a list of {n} numbers")
    if len(values) != n:
        raise RecipeError(f"{what} returned {len(values)} values for {n} completions")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RecipeError(f"{what} returned {v!r} at index {i}; every value must be a finite number")
        out.append(float(v))
    return out


def build_rewards(cfgs: list[RewardCfg], key: str = "trainer.rewards", max_length: int = 2048,
                  batch_size: int = 64) -> Rewards:
    """Rewards from recipe entries; imports user functions and checks reward-model directories
    (config, tokenizer, template) now, loading no weights."""
    if not cfgs:
        raise RecipeError(f"{key}: needs at least one reward (a verifier such as {{type: numeric}}, "
                          "a reward model {type: model, path: ...} or {type: function, function: pkg.mod:fn})")
    components = []
    for i, cfg in enumerate(cfgs):
        components.append(_component(cfg, f"{key}.{i}", max_length, batch_size))
    names = [c.name for c in components]
    for c in components:  # same-named parts would overwrite each other in samples.jsonl
        if names.count(c.name) > 1:
            c.name = f"{c.name}#{c.key.rsplit('.', 1)[-1]}"
    return Rewards(components)


def _component(cfg: RewardCfg, key: str, max_length: int, batch_size: int) -> RewardComponent:
    t = cfg.type
    if t == "exact_match":
        return RewardComponent(t, key, cfg.weight, exact_match_reward(cfg.column), cfg.column)
    if t == "numeric":
        return RewardComponent(t, key, cfg.weight, numeric_reward(cfg.column), cfg.column, numeric_column=True)
    if t == "regex":
        return RewardComponent(t, key, cfg.weight, regex_reward(cfg.pattern))
    if t == "length":
        return RewardComponent(t, key, cfg.weight, length_reward(cfg.min_length, cfg.max_length))
    if t == "function":
        return RewardComponent(f"function:{cfg.function}", key, cfg.weight, import_function(cfg.function, key))
    from finetune.models.reward_model import RewardModelScorer

    scorer = RewardModelScorer(cfg.path, f"{key}.path", max_length=max_length, batch_size=batch_size)
    return RewardComponent(f"model:{cfg.path}", key, cfg.weight, scorer)
