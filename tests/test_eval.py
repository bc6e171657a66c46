"""finetune eval: pass@k arithmetic, exact match / perplexity / reward end to end on a tiny model, bad input."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.data.formats import Conversation
from finetune.data.tokenizer import encode_text
from finetune.infer import eval_cli, inference
from finetune.infer.eval_cli import (
    add_eval_arguments,
    cmd_eval,
    eval_perplexity,
    pass_at_k,
    pass_metrics,
    reward_metrics,
)
from finetune.infer.inference import Completion, Settings, generate, load_for_inference
from finetune.recipe.schema import RewardCfg
from finetune.rl.rewards import build_rewards
from tests.conftest import save_tiny_chat_model, save_tiny_reward_model, write

QUESTIONS = ["What is 2 + 3?", "What is 7 + 5?", "What is 9 - 4?", "What is 1 + 1?"]


def completion_length(prompts, completions, **_columns):
    """A reward function for the tests: the completion's length in characters."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run as the trainers leave it: recipe.yaml and final/ (a full model)."""
    run = tmp_path_factory.mktemp("eval") / "run"
    save_tiny_chat_model(run / "final")
    write(run / "recipe.yaml", "trainer: {type: sft}\n")
    return run


@pytest.fixture(scope="module")
def lm(run_dir):
    return load_for_inference(str(run_dir))


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    rc = cmd_eval(parser.parse_args(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def jsonl(path: Path, rows: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- the arithmetic


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # fewer than k failures: always passes
    scores = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    got = pass_metrics(scores)
    assert list(got) == ["pass@1", "pass@2", "pass@4"]
    assert got["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert got["pass@2"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert got["pass@4"] == pytest.approx(2 / 3)
    assert pass_metrics([[1.0], [0.0], [0.5]], threshold=0.5) == {"exact_match": pytest.approx(2 / 3)}
    assert reward_metrics([[1.0, 3.0], [2.0, 2.0]]) == {"reward_mean": 2.0, "reward_std": pytest.approx(math.sqrt(0.5)),
                                                        "reward_min": 1.0, "reward_max": 3.0}


def fake_groups(texts: list[list[str]]):
    return lambda lm, convs, settings, n, batch_size: [[Completion(c.messages, t, 3, True) for t in g]
                                                       for c, g in zip(convs, texts, strict=True)]


@pytest.mark.parametrize(("verifier", "expected"), [("exact_match", 0.5), ("numeric", 0.75)])
def test_exact_match_with_known_completions(monkeypatch, verifier, expected):
    convs = [Conversation([{"role": "user", "content": q}], f"x:{i}", extra={"answer": a})
             for i, (q, a) in enumerate(zip(QUESTIONS, ["5", "12", "5", "2"], strict=True))]
    # normalised equal; equal; "so 5." is numeric-equal only; wrong for both
    monkeypatch.setattr(eval_cli, "sample_groups", fake_groups([[" 5 "], ["12."], ["so 5."], ["3"]]))
    rewards = build_rewards([RewardCfg(type=verifier)])
    result = eval_cli.eval_generations(None, convs, rewards, "exact_match", Settings(), 1, 1.0, "answer")
    assert result.metrics["exact_match"] == expected
    assert result.samples[1] == {"origin": "x:1", "prompt": convs[1].messages, "reference": "12",
                                 "completions": ["12."], "scores": [1.0], "stopped": [True]}


# ---------------------------------------------------------------- the real path on the tiny model


def test_exact_match_end_to_end_with_a_known_score(run_dir, lm, tmp_path, capsys):
    settings = Settings(max_new_tokens=6)
    greedy = generate(lm, QUESTIONS, settings)
    # The model's own greedy answers are right for the first two questions, wrong for the others.
    answers = [greedy[0].text, greedy[1].text, "no", "never"]
    data = jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": a} for q, a in zip(QUESTIONS, answers, strict=True)])
    rc, out, err = run([str(run_dir), "--data", str(data), "--max-new-tokens", "6"], capsys)
    assert rc == 0, err
    saved = json.loads((run_dir / "eval-exact_match-qa.json").read_text())  # default: in the run dir
    assert saved["metrics"]["exact_match"] == 0.5 and saved["details"]["prompts"] == 4
    assert [s["completions"][0] for s in saved["samples"]] == [c.text for c in greedy]
    assert "exact_match" in out and "0.5000" in out and "eval-exact_match-qa.json" in out


def test_pass_at_k_end_to_end_is_reproducible(run_dir, tmp_path, capsys):
    data = jsonl(tmp_path / "qa.jsonl", [{"prompt": q, "answer": "5"} for q in QUESTIONS[:2]])
    argv = [str(run_dir), "--data", str(data), "--n", "3", "--max-new-tokens", "4"]
    results = []
    for name in ("a.json", "b.json"):
        rc, _, err = run([*argv, "--out", str(tmp_path / name)], capsys)
        assert rc == 0, err
        results.append(json.loads((tmp_path / name).read_text()))
    assert list(results[0]["metrics"])[:3] == ["pass@1", "pass@2", "pass@3"]
    assert all(len(s["completions"]) == 3 for s in results[0]["samples"])
    assert results[0]["samples"] == results[1]["samples"]  # seeded sampling (--seed 0 by default)
    assert "3 samples at temperature 1.0" in results[0]["details"]["decoding"]


def test_perplexity_is_the_token_mean_nll_over_documents(run_dir, lm, tmp_path, capsys):
    docs = ["3 + 4 = 7", "What is 12 + 5? 12 + 5 = 17 and 9 - 4 = 5", "1 + 1 = 2"]
    data = write(tmp_path / "docs.txt", "\n\n".join(docs) + "\n")
    nll = tokens = 0.0
    with torch.no_grad():
        for doc in docs:  # by hand: one unpadded forward per document, EOS appended as in pretraining
            ids = torch.tensor([encode_text(lm.tokenizer, doc)])
            logits = lm.model(input_ids=ids).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1] - 1
    rc, out, err = run([str(run_dir), "--data", str(data), "--task", "perplexity", "--out", str(tmp_path / "p.json")],
                       capsys)
    assert rc == 0, err
    metrics = json.loads((tmp_path / "p.json").read_text())["metrics"]
    assert metrics["nll"] == pytest.approx(nll / tokens, abs=1e-5)  # padded batches change nothing
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    units = eval_cli.perplexity_units(lm.tokenizer, eval_cli.EvalData(str(data), "text"))
    windowed = eval_perplexity(lm, units, max_length=4, batch_size=2)
    assert windowed.details["tokens"] == sum(len(u["ids"]) - math.ceil(len(u["ids"]) / 4) for u in units)


def test_perplexity_of_conversations_counts_assistant_tokens(run_dir, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}]
    data = jsonl(tmp_path / "chat.jsonl", rows)
    rc, _, err = run([str(run_dir), "--data", str(data), "--task", "perplexity", "--format", "messages",
                      "--out", str(tmp_path / "c.json")], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "c.json").read_text())["details"]["tokens"] == 2  # "5" and <|im_end|>


def test_reward_function_mean(run_dir, lm, tmp_path, capsys):
    data = jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q in QUESTIONS[:3]])
    rc, _, err = run([str(run_dir), "--data", str(data), "--task", "reward", "--max-new-tokens", "5",
                      "--reward-function", "tests.test_eval:completion_length", "--out", str(tmp_path / "r.json")],
                     capsys)
    assert rc == 0, err
    texts = [c.text for c in generate(lm, QUESTIONS[:3], Settings(max_new_tokens=5))]
    metrics = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert metrics["reward_mean"] == pytest.approx(sum(map(len, texts)) / 3)


def test_reward_model_mean(run_dir, lm, tmp_path, capsys):
    from finetune.models.reward_model import RewardModelScorer

    save_tiny_reward_model(tmp_path / "rm", run_dir / "final")
    data = jsonl(tmp_path / "p.jsonl", [{"prompt": q} for q in QUESTIONS[:2]])
    rc, _, err = run([str(run_dir), "--data", str(data), "--task", "reward", "--max-new-tokens", "4",
                      "--reward-model", str(tmp_path / "rm"), "--out", str(tmp_path / "r.json")], capsys)
    assert rc == 0, err
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS[:2]]
    texts = [c.text for c in generate(lm, prompts, Settings(max_new_tokens=4))]
    expected = RewardModelScorer(str(tmp_path / "rm"), "rm")(prompts, texts)
    got = json.loads((tmp_path / "r.json").read_text())["metrics"]["reward_mean"]
    assert got == pytest.approx(sum(expected) / 2, abs=1e-5)


# ---------------------------------------------------------------- bad input: exit 2, one line, no weights


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(inference, "load_model", refuse)


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), err


@pytest.mark.parametrize(("rows", "extra", "fragments"), [
    ([{"prompt": "q", "answer": "1"}, {"prompt": "q", "solution": "2"}], [],
     ["qa.jsonl:2", "'answer'", "present: prompt, solution", "--column"]),
    ([{"question": "q", "answer": "1"}], [], ["qa.jsonl:1", "'prompt'", "present: question, answer"]),
    ([{"prompt": "q", "answer": "seven"}], ["--verifier", "numeric"], ["compares numbers", "'seven'"]),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], [],
     ["needs column(s) 'prompt', 'answer'", "present: messages", "look like --format messages"]),
    ([{"prompt": "q"}], ["--task", "reward"], ["--reward-model"]),
    ([{"prompt": "q"}], ["--task", "perplexity", "--format", "prompts"], ["perplexity reads text"]),
    ([{"prompt": "q", "answer": "1"}], ["--n", "4", "--temperature", "0"], ["--temperature must be > 0"]),
    ([{"prompt": "q", "answer": "1"}], ["--verifier", "fuzzy"], ["--verifier fuzzy"]),
])
def test_bad_eval_sets_and_flags(run_dir, tmp_path, capsys, no_weights, rows, extra, fragments):
    data = jsonl(tmp_path / "qa.jsonl", rows)
    rc, _, err = run([str(run_dir), "--data", str(data), *extra], capsys)
    assert_one_line_error(rc, err, *fragments)


def test_not_a_reward_model(run_dir, tmp_path, capsys, no_weights):
    data = jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    rc, _, err = run([str(run_dir), "--data", str(data), "--task", "reward", "--reward-model",
                      str(run_dir / "final")], capsys)
    assert_one_line_error(rc, err, "not a reward model")


def test_missing_run_final(tmp_path, capsys, no_weights):
    write(tmp_path / "run" / "recipe.yaml", "trainer: {type: sft}\n")
    data = jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "answer": "1"}])
    rc, _, err = run([str(tmp_path / "run"), "--data", str(data)], capsys)
    assert_one_line_error(rc, err, "has no final/")
    shutil.rmtree(tmp_path / "run")
