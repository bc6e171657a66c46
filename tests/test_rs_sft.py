"""Rejection-sampling SFT: selection rules on hand-made samples, round statistics, and the trainer's
rounds on a tiny model (files, accumulate, resume per round, clean stops, adapters)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.rl.selection import ScoredSample, SelectionRule, distinct_n, preference_pairs, round_stats, select_samples
from finetune.run.launch import run_recipe
from finetune.trainers.rs_sft import RoundRunner, round_recipe
from tests.conftest import read_metrics, save_tiny_reward_model, write
from tests.tiny_cache import shared_tiny_model


def samples(*specs) -> list[ScoredSample]:
    """specs: (prompt, text, reward[, stopped]) in sample order per prompt."""
    out, seen = [], {}
    for spec in specs:
        p, text, reward = spec[:3]
        stopped = spec[3] if len(spec) > 3 else True
        seen[p] = seen.get(p, -1) + 1
        out.append(ScoredSample(p, seen[p], text, reward, stopped, token_ids=[ord(c) for c in text]))
    return out


def kept(batch: list[ScoredSample]) -> list[tuple[int, str]]:
    return [(s.prompt_index, s.text) for s in batch if s.kept]


BATCH = [(0, "a", 0.2), (0, "b", 0.9), (0, "c", 0.9), (0, "d", 5.0, False), (0, "e", 0.5),
         (1, "x", 0.1), (1, "y", 0.3),
         (2, "  q ", 1.0), (2, "q", 1.0), (2, "r", 1.0), (2, "", 2.0)]


@pytest.mark.parametrize("rule, want", [
    # the best stopped sample per prompt; ties go to the earlier sample; truncated and empty never kept
    (SelectionRule("best_of_n"), [(0, "b"), (1, "y"), (2, "  q ")]),
    (SelectionRule("best_of_n", min_reward=0.5), [(0, "b"), (2, "  q ")]),
    (SelectionRule("top_k", k=2), [(0, "b"), (0, "c"), (1, "x"), (1, "y"), (2, "  q "), (2, "r")]),
    (SelectionRule("threshold", threshold=0.5), [(0, "b"), (0, "c"), (0, "e"), (2, "  q "), (2, "r")]),
    (SelectionRule("all_correct", threshold=0.9, max_per_prompt=1), [(0, "b"), (2, "  q ")]),
    (SelectionRule("all_correct", threshold=0.9, max_per_prompt=5, dedupe="exact"),
     [(0, "b"), (0, "c"), (2, "  q "), (2, "q"), (2, "r")]),
    (SelectionRule("threshold", threshold=1.0, dedupe="none"), [(2, "  q "), (2, "q"), (2, "r")]),
])
def test_selection_rules(rule, want):
    batch = samples(*BATCH)
    returned = select_samples(batch, rule)
    assert kept(batch) == sorted(kept(returned)) == want


def test_every_sample_says_why_it_was_or_was_not_kept():
    batch = samples(*BATCH)
    select_samples(batch, SelectionRule("all_correct", threshold=0.9, max_per_prompt=1))
    assert [s.reason for s in batch] == [
        "below_threshold", "kept", "not_selected", "truncated", "below_threshold",
        "below_threshold", "below_threshold",
        "kept", "duplicate", "not_selected", "empty"]


def test_round_stats_and_distinct_n_by_hand():
    batch = samples((0, "ab", 1.0), (0, "ab", 0.0), (0, "abc", 0.0, False),
                    (1, "x", 0.0), (1, "y", 3.0), (1, "z", 0.0))
    select_samples(batch, SelectionRule("best_of_n"))
    stats = round_stats(batch)
    assert stats["kept"] == 2 and stats["acceptance_rate"] == pytest.approx(2 / 6)
    assert stats["prompts_with_kept"] == 1.0
    assert stats["reward_max"] == pytest.approx((1 + 3) / 2)
    assert stats["reward_median"] == pytest.approx((0 + 0) / 2)
    assert stats["reward_mean"] == pytest.approx((1 / 3 + 1) / 2)
    assert stats["truncated_rate"] == pytest.approx(1 / 6)
    # prompt 0: unigrams a,b,a,b,a,b,c -> 3 distinct of 7; prompt 1: x,y,z -> 3 of 3
    assert stats["distinct_1"] == pytest.approx((3 / 7 + 1) / 2)
    assert distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    pairs = preference_pairs(batch)
    assert [(p.prompt_index, p.chosen, p.rejected, p.margin) for p in pairs] == [(0, "ab", "ab", 1.0),
                                                                                 (1, "y", "z", 3.0)]


# ---------------------------------------------------------------- the trainer on a tiny model

STOPS = "finetune.rl.rollout.stop_token_ids"


def reward_length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]


CALLS = {"n": 0}


def reward_first_call_only(prompts, completions, **columns):
    """1 for every completion the first time it is called, 0 afterwards."""
    CALLS["n"] += 1
    return [1.0 if CALLS["n"] == 1 else 0.0 for _ in completions]


def reward_zero(prompts, completions, **columns):
    return [0.0 for _ in completions]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture
def often_stopping(monkeypatch):
    """A random tiny model almost never emits <|im_end|>: a quarter of the vocabulary stops it."""
    monkeypatch.setattr(STOPS, lambda tok: list(range(0, len(tok), 4)))


def rs_recipe(tmp: Path, model_dir: Path, reward: str, **rejection) -> dict:
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(12)]
    write(tmp / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:8]))
    write(tmp / "held_out.jsonl", "".join(json.dumps(r) + "\n" for r in rows[8:]))
    return {
        "model": {"name": str(model_dir)},
        "tokenizer": {"chat_template": "chatml", "max_length": 64},
        "data": {"train": [{"path": str(tmp / "prompts.jsonl"), "format": "prompts"}],
                 "eval": [{"path": str(tmp / "held_out.jsonl"), "format": "prompts"}]},
        "trainer": {"type": "rs_sft", "sampling": {"n": 4, "max_new_tokens": 6},
                    "rewards": [{"type": "function", "function": f"tests.test_rs_sft:{reward}"}],
                    "rejection": {"rounds": 2, **rejection}},
        "optim": {"lr": 1e-2},
        "run": {"output_dir": str(tmp / "rs"), "max_steps": 2, "micro_batch_size": 4, "log_every": 1},
    }


def test_rounds_accumulate_continue_and_resume(in_tmp, tiny_model_dir, often_stopping):
    from safetensors.torch import load_file

    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_length")
    final = run_recipe(recipe_from_dict(recipe))
    out = in_tmp / "rs"
    r1, r2 = out / "rounds/round-1", out / "rounds/round-2"
    assert [r["round"] for r in read_metrics(out)] == [0, 1, 2]
    assert {"acceptance_rate", "reward_max", "reward_median", "distinct_2", "eval_pass@1", "eval_pass@n",
            "sft_steps"} <= set(read_metrics(out)[2])
    rows = [json.loads(x) for x in (r2 / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 * 4 and all(r["stopped"] and r["completion"].strip() for r in rows if r["kept"])
    for p in range(8):  # best_of_n: the longest stopped, non-empty completion of each prompt
        mine = [r for r in rows if r["prompt_index"] == p and r["stopped"] and r["completion"].strip()]
        assert sum(r["kept"] for r in mine) == (1 if mine else 0)
        if mine:
            assert next(r for r in mine if r["kept"])["reward"] == max(r["reward"] for r in mine)
    trained = [json.loads(x) for x in (r2 / "sft_train.jsonl").read_text().splitlines()]
    assert {t["round"] for t in trained} == {1, 2}  # keep: accumulate
    assert f"name: {r1 / 'final'}" in (r2 / "recipe.yaml").read_text()  # restart: previous
    weights = [load_file(d / "model.safetensors")["model.norm.weight"] for d in (tiny_model_dir, r1 / "final", final)]
    assert not weights[0].equal(weights[1]) and not weights[1].equal(weights[2])
    assert load_file(final / "model.safetensors")["model.norm.weight"].equal(
        load_file(r2 / "final/model.safetensors")["model.norm.weight"])

    # Killed during round 2's SFT: round 1 is read back, round 2's samples are reused, not redrawn.
    import shutil

    samples_before = (r2 / "samples.jsonl").read_text()
    for gone in (out / "final", r2 / "final", r2 / "round.json"):
        shutil.rmtree(gone) if gone.is_dir() else gone.unlink()
    run_recipe(recipe_from_dict(recipe))
    assert (r2 / "samples.jsonl").read_text() == samples_before
    assert [r["round"] for r in read_metrics(out)] == [0, 1, 2, 2]
    assert (out / "final/model.safetensors").is_file()
    changed = rs_recipe(in_tmp, tiny_model_dir, "reward_length", select="top_k")
    (out / "final").rename(out / "final-old")
    with pytest.raises(RecipeError, match="holds rounds of a different run"):
        run_recipe(recipe_from_dict(changed))


def test_a_threshold_never_met_stops_round_one_with_a_clear_error(in_tmp, tiny_model_dir, often_stopping):
    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_zero", select="threshold", threshold=0.5)
    with pytest.raises(DataError, match=r"round 1: no sample reached threshold's minimum reward 0.5 "
                                        r"\(best: 0\); nothing to train on"):
        run_recipe(recipe_from_dict(recipe))
    rows = (in_tmp / "rs/rounds/round-1/samples.jsonl").read_text().splitlines()
    assert len(rows) == 32 and not any(json.loads(r)["kept"] for r in rows)
    assert "stopped" in read_metrics(in_tmp / "rs")[-1]


def test_a_round_that_keeps_nothing_ends_the_run_with_the_previous_model_adapter(in_tmp, tiny_model_dir,
                                                                                  often_stopping):
    CALLS["n"] = 0
    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_first_call_only", select="all_correct", threshold=1.0,
                       max_per_prompt=2, eval_rewards=[{"type": "numeric"}])
    recipe["adapter"] = {"r": 4, "alpha": 8}
    final = run_recipe(recipe_from_dict(recipe))
    out = in_tmp / "rs"
    assert (final / "adapter_config.json").is_file()
    assert (final / "adapter_model.safetensors").read_bytes() == \
        (out / "rounds/round-1/final/adapter_model.safetensors").read_bytes()
    last = read_metrics(out)[-1]
    assert last["round"] == 2 and last["kept"] == 0 and "stopped" in last
    assert not (out / "rounds/round-2/final").exists()


def test_round_recipe_and_training_rows_for_base_restart_and_latest(tmp_path, tiny_model_dir):
    recipe = recipe_from_dict(rs_recipe(tmp_path, tiny_model_dir, "reward_zero", keep="latest", restart="base"))
    rr = round_recipe(recipe, 3, None, tmp_path / "s.jsonl")
    assert rr.trainer.type == "sft" and rr.model.name == str(tiny_model_dir)
    assert rr.run.output_dir == str(tmp_path / "rs/rounds/round-3") and rr.data.eval is None
    assert round_recipe(recipe, 3, tmp_path / "prev", tmp_path / "s.jsonl").model.name == str(tmp_path / "prev")
    prompts = [SimpleNamespace(messages=[{"role": "user", "content": f"q{i}"}]) for i in range(2)]
    runner = RoundRunner(recipe, SimpleNamespace(prompts=prompts), tmp_path / "rs", None)
    old = samples((0, "old", 1.0), (1, "same", 1.0))
    select_samples(old, SelectionRule("best_of_n"))
    write(tmp_path / "rs/rounds/round-1/samples.jsonl", "".join(
        json.dumps(s.to_row(prompts[s.prompt_index].messages)) + "\n" for s in old))
    new = samples((0, "new", 1.0), (1, " same", 1.0))
    select_samples(new, SelectionRule("best_of_n"))
    assert [r["messages"][-1]["content"] for r in runner.training_rows(2, new)] == ["new", " same"]
    runner.rej = runner.rej.model_copy(update={"keep": "accumulate"})
    # accumulate: both rounds, each (prompt, whitespace-normalised text) once
    assert [(r["round"], r["messages"][-1]["content"]) for r in runner.training_rows(2, new)] == \
        [(1, "old"), (1, "same"), (2, "new")]


def test_rs_sft_needs_prompts_and_the_verifiers_columns(in_tmp, tiny_model_dir):
    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_zero")
    recipe["trainer"]["rewards"] = [{"type": "numeric", "column": "solution"}]
    with pytest.raises(DataError, match=r"prompts.jsonl:1: trainer.rewards.0 \(numeric\) reads column 'solution'"):
        run_recipe(recipe_from_dict(recipe))
    recipe["data"]["train"][0]["format"] = "messages"
    with pytest.raises(DataError, match="rs_sft samples completions of format 'prompts' rows"):
        run_recipe(recipe_from_dict(recipe))
    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_zero")
    recipe["trainer"]["sampling"]["n"] = 0
    with pytest.raises(RecipeError, match=r"trainer.sampling.n: Input should be greater than or equal to 1"):
        recipe_from_dict(recipe)


def test_demo_data_is_reproduced_and_keeps_the_quickstart_split(tmp_path):
    from finetune.demo import synth_rs
    from tests.conftest import ROOT

    files = synth_rs.generate(tmp_path)
    for name, content in files.items():
        assert (ROOT / "data/quickstart_rs" / name).read_text(encoding="utf-8") == content, name
    key = lambda row: tuple(x for x in row["prompt"].replace("?", " ").replace(".", " ").split()  # noqa: E731
                            if x.isdigit() or x in "+-")
    rows = lambda path: [json.loads(x) for x in path.read_text().splitlines()]  # noqa: E731
    held_out = {key(r) for r in rows(ROOT / "data/quickstart/prompts_eval.jsonl")}
    train = rows(ROOT / "data/quickstart_rs/prompts_train.jsonl")
    assert len(train) == 1530 and not {key(r) for r in train} & held_out
    preference_eval = rows(ROOT / "data/quickstart_rs/preference_eval.jsonl")
    assert len(preference_eval) == 300 and {key(r) for r in preference_eval} == held_out
    for pair in preference_eval + rows(ROOT / "data/quickstart_rs/preference_train.jsonl"):
        a, op, b, _, c = pair["rejected"].split()  # another problem, true in itself
        assert pair["chosen"].startswith(" ".join(key(pair))) and (a, op, b) != key(pair)
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
    evals = rows(ROOT / "data/quickstart_rs/prompts_eval.jsonl")
    assert len(evals) == 300 and {key(r) for r in evals} == held_out
    prompt = [{"role": "user", "content": "What is 2 + 7?"}]
    assert synth_rs.fact_reward([prompt] * 4, ["2 + 7 = 9", "1 + 7 = 9", " 2 + 7 =  9 ", "9"], answer=["9"] * 4) \
        == [1.0, 0.0, 1.0, 0.0]


def test_a_reward_model_scores_the_samples(in_tmp, tiny_model_dir, often_stopping):
    rm_dir = save_tiny_reward_model(in_tmp / "rm", tiny_model_dir)
    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_zero", rounds=1, eval_rewards=[{"type": "numeric"}])
    recipe["trainer"]["rewards"] = [{"type": "model", "path": str(rm_dir)}]
    run_recipe(recipe_from_dict(recipe))
    rows = [json.loads(x) for x in (in_tmp / "rs/rounds/round-1/samples.jsonl").read_text().splitlines()]
    scores = [r["rewards"][f"model:{rm_dir}"] for r in rows]
    assert len(set(scores)) > len(scores) // 2  # real, per-sample reward-model scores
    assert all(r["reward"] == s for r, s in zip(rows, scores, strict=True))


def test_sampling_runs_in_the_runs_autocast(in_tmp, tiny_model_dir, often_stopping, monkeypatch):
    # run.precision bf16: the SFT steps autocast (accelerate) and so must the sampling, or fp32
    # master weights sample in fp32 on a GPU. On the CPU, bf16 autocast shows the same mechanism.
    import torch

    from finetune.trainers import rs_sft

    seen = []
    real = rs_sft.load_policy

    def load_policy(*args, **kwargs):
        model = real(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, _: seen.append(
            (module.training, torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))))
        return model

    monkeypatch.setattr(rs_sft, "load_policy", load_policy)
    recipe = rs_recipe(in_tmp, tiny_model_dir, "reward_length", rounds=1)
    recipe["run"]["precision"] = "bf16"
    run_recipe(recipe_from_dict(recipe))
    sampling = {dtype for training, dtype in seen if not training}
    assert sampling == {torch.bfloat16}, seen[:5]
    assert any(training for training, _ in seen)  # the round's SFT went through the same model
