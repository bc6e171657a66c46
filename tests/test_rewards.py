"""Verifiers, user functions, their combination, and every bad input they can meet."""

from __future__ import annotations

import pytest

from finetune.data.formats import Conversation
from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import RewardCfg, recipe_from_dict
from finetune.rl.rewards import build_rewards, last_number, parse_number
from tests.conftest import write

PROMPT = [{"role": "user", "content": "What is 7 + 5?"}]


def score(cfgs: list[dict], completions: list[str], **columns):
    rewards = build_rewards([RewardCfg(**c) for c in cfgs])
    rows = [{k: v[i] for k, v in columns.items()} for i in range(len(completions))]
    return rewards([PROMPT] * len(completions), completions, rows)


def test_numeric_reads_the_last_number_so_a_restated_fact_passes():
    got = score([{"type": "numeric"}], ["7 + 5 = 12", "7 + 5 = 13", "12.", "no idea", "12 or 13", "1,234", "-3"],
                answer=["12", "12", "12", "12", "12", "1234", "-3"])
    assert got.total == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert last_number("x = 2.50") == 2.5 and parse_number(" 7 ") == 7.0 and parse_number("seven") is None


def test_exact_match_normalises_whitespace_case_and_full_stop():
    got = score([{"type": "exact_match", "column": "ref"}], ["  Paris. ", "paris", "Paris is it"],
                ref=["paris", "PARIS", "paris"])
    assert got.total == [1.0, 1.0, 0.0]


def test_regex_and_length_checks():
    assert score([{"type": "regex", "pattern": r"^\d+ [+-] \d+ = \d+$"}], ["7 + 5 = 12", "it is 12"]).total == [1, 0]
    assert score([{"type": "length", "min_length": 2, "max_length": 4}], ["a", "ab", "abcd", "abcde"]).total == \
        [0, 1, 1, 0]


def test_components_are_summed_with_their_weights_and_kept_apart():
    got = score([{"type": "numeric", "weight": 2.0}, {"type": "regex", "pattern": "=", "weight": -0.5}],
                ["7 + 5 = 12", "12", "7 + 5 = 11"], answer=["12", "12", "12"])
    assert got.total == [1.5, 2.0, -0.5]
    assert got.parts == {"numeric": [1.0, 1.0, 0.0], "regex": [1.0, 0.0, 1.0]}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module on sys.path; returns a fresh module name for each test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    write(tmp_path / f"{name}.py", """
def score(prompts, completions, answer, **columns):
    return [float(c.strip().endswith(a)) + 0.5 * ("source" in columns) for c, a in zip(completions, answer)]

def short(prompts, completions, **columns):
    return [1.0]

def words(prompts, completions, **columns):
    return ["high" for _ in completions]

def nan(prompts, completions, **columns):
    return [float("nan") for _ in completions]

not_callable = 3
""")
    return name


def test_user_function_gets_prompts_completions_and_every_column(user_module):
    got = score([{"type": "function", "function": f"{user_module}:score"}], ["7 + 5 = 12", "13"],
                answer=["12", "12"], source=["a", "b"])
    assert got.total == [1.5, 0.5]
    assert list(got.parts) == [f"function:{user_module}:score"]


@pytest.mark.parametrize("target, message", [
    ("no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
    ("{m}:missing", "has no attribute 'missing'"),
    ("{m}:not_callable", "is not callable"),
])
def test_user_function_that_does_not_resolve_is_a_recipe_error(user_module, target, message):
    with pytest.raises(RecipeError, match=message) as err:
        build_rewards([RewardCfg(type="function", function=target.format(m=user_module))])
    assert str(err.value).startswith("trainer.rewards.0.function: ")


@pytest.mark.parametrize("fn, message", [
    ("short", r"returned 1 values for 2 completions"),
    ("words", r"returned 'high' at index 0"),
    ("nan", r"returned nan at index 0"),
])
def test_user_function_with_wrong_output_is_a_recipe_error(user_module, fn, message):
    with pytest.raises(RecipeError, match=message):
        score([{"type": "function", "function": f"{user_module}:{fn}"}], ["a", "b"], answer=["1", "2"])


@pytest.mark.parametrize("reward, message", [
    ({"type": "regex"}, "a regex reward needs `pattern`"),
    ({"type": "regex", "pattern": "(unclosed"}, "is not a regular expression"),
    ({"type": "function", "function": "no_colon"}, "must be an import path"),
    ({"type": "model"}, "a model reward needs `path`"),
    ({"type": "length"}, "needs min_length and/or max_length"),
    ({"type": "verifier"}, "trainer.rewards.0.type"),
])
def test_reward_entries_are_checked_when_the_recipe_loads(tmp_path, reward, message):
    recipe = {"model": {"name": "m"}, "data": {"train": [{"path": "p.jsonl", "format": "prompts"}]},
              "trainer": {"type": "rs_sft", "rewards": [reward]}, "run": {"output_dir": str(tmp_path)}}
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe)


def test_no_reward_at_all_is_a_recipe_error():
    with pytest.raises(RecipeError, match="needs at least one reward"):
        build_rewards([])


def test_rows_without_the_column_a_verifier_reads_are_named():
    rewards = build_rewards([RewardCfg(type="numeric", column="answer")])
    good = Conversation(PROMPT, "p.jsonl:1", extra={"answer": "12"})
    rewards.check_rows([good], "data.train")
    with pytest.raises(DataError, match=r"p.jsonl:2: trainer.rewards.0 \(numeric\) reads column 'answer'.*"
                                        r"\(other columns: solution\)"):
        rewards.check_rows([good, Conversation(PROMPT, "p.jsonl:2", extra={"solution": "12"})], "data.train")
    with pytest.raises(DataError, match=r"p.jsonl:3: .* holds 'twelve'"):
        rewards.check_rows([Conversation(PROMPT, "p.jsonl:3", extra={"answer": "twelve"})], "data.train")


def test_a_function_reward_row_missing_a_column_the_others_have_is_named():
    rewards = build_rewards([RewardCfg(type="function", function="finetune.demo.synth_rs:fact_reward")])
    rows = [Conversation(PROMPT, f"p.jsonl:{i}", extra={"answer": "12"}) for i in (1, 2)]
    rewards.check_rows(rows, "data.train")
    with pytest.raises(DataError, match=r"p.jsonl:3: trainer.rewards.0 \(function:finetune.demo.synth_rs:fact_reward\) "
                                        r"is called with column 'answer', which this data.train row lacks"):
        rewards.check_rows([*rows, Conversation(PROMPT, "p.jsonl:3", extra={})], "data.train")
