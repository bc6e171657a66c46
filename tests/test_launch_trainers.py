"""The reward and rs_sft trainers under `finetune launch --num-processes 2` (two gloo CPU processes)
train as one process does with the same global batch, and write their files once."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import save_tiny_chat_model, write
from tests.test_reward_trainer import reward_recipe
from tests.tiny_cache import shared_tiny_model

# Adam with eps far above the gradients steps ~lr*g/eps, and no clipping: a gradient scaled wrongly
# across ranks (e.g. DDP's average left uncorrected) shows in the weights, not only a wrong split.
SCALE_SENSITIVE = {"lr": 0.5, "eps": 10.0, "max_grad_norm": None, "scheduler": "constant"}


def launch_two(tmp, data: dict) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(tmp / f"{data['run']['output_dir'].rsplit('/', 1)[-1]}.yaml", json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "finetune", "launch", str(path), "--num-processes", "2",
                           "--master", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launching 2 process(es)" in proc.stderr and proc.stderr.count("done:") == 1
    return proc


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_same_weights(a, b, tol: float = 1e-5) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=tol)


def test_reward_trainer_two_processes_equal_one(in_tmp, tmp_path_factory):
    model_dir = shared_tiny_model(tmp_path_factory)

    def recipe(name: str, micro_batch_size: int) -> dict:
        data = reward_recipe(in_tmp, model_dir)
        data["run"].update(output_dir=str(in_tmp / name), max_steps=3, micro_batch_size=micro_batch_size,
                           eval_every=3)
        data["optim"] = SCALE_SENSITIVE
        return data

    run_recipe(recipe_from_dict(recipe("one", 8)))
    launch_two(in_tmp, recipe("two", 4))
    assert_same_weights(in_tmp / "one" / "final", in_tmp / "two" / "final")
    one, two = records(in_tmp / "one" / "metrics.jsonl"), records(in_tmp / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one]  # rank 0 alone logs: no record twice
    for a, b in zip(one, two, strict=True):  # training losses, and evals over both ranks' halves
        for key in ("loss", "eval_loss", "eval_accuracy", "eval_reward_gap"):
            assert (key in a) == (key in b), key
            assert key not in a or b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert sum("eval_loss" in r for r in two) == 2  # at the start and at step 3


@pytest.fixture(scope="module")
def stopping_model_dir(tmp_path_factory):
    """A tiny random chat model that ends about half its replies within 6 tokens (a random one
    almost never emits <|im_end|>, and rs_sft keeps only stopped replies): embedding dimension 0
    is 1 for every token, so the stop tokens' logits get a steady boost through lm_head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.tokenizer import stop_token_ids

    path = save_tiny_chat_model(tmp_path_factory.mktemp("stopping") / "model")
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[stop_token_ids(AutoTokenizer.from_pretrained(path)), 0] = 0.7
    model.save_pretrained(path)
    return path


def test_rs_sft_two_processes_sample_every_prompt_once_and_train_as_one(in_tmp, stopping_model_dir):
    """2 processes sample their halves of the prompts; with the samples of that run, one process with
    the same global batch trains the round to the same weights (one RNG stream cannot reproduce
    two ranks' samples, so the samples are shared and the rest is compared)."""
    rows = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(12)]
    write(in_tmp / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:8]))
    write(in_tmp / "held_out.jsonl", "".join(json.dumps(r) + "\n" for r in rows[8:]))

    def recipe(name: str, micro_batch_size: int) -> dict:
        return {
            "model": {"name": str(stopping_model_dir)},
            "tokenizer": {"chat_template": "chatml", "max_length": 64},
            "data": {"train": [{"path": str(in_tmp / "prompts.jsonl"), "format": "prompts"}],
                     "eval": [{"path": str(in_tmp / "held_out.jsonl"), "format": "prompts"}]},
            "trainer": {"type": "rs_sft", "sampling": {"n": 4, "max_new_tokens": 6},
                        "rewards": [{"type": "length", "min_length": 1}], "rejection": {"rounds": 1}},
            "optim": SCALE_SENSITIVE,
            "run": {"output_dir": str(in_tmp / name), "max_steps": 2, "micro_batch_size": micro_batch_size,
                    "log_every": 1},
        }

    proc = launch_two(in_tmp, recipe("two", 2))
    two = in_tmp / "two"
    samples = records(two / "rounds/round-1/samples.jsonl")
    assert sorted((s["prompt_index"], s["sample_index"]) for s in samples) == [(p, j) for p in range(8)
                                                                               for j in range(4)]
    kept = [s for s in samples if s["kept"]]
    assert len(kept) >= 4 and all(s["stopped"] and s["completion"].strip() for s in kept)
    assert [r["round"] for r in records(two / "metrics.jsonl")] == [0, 1]
    assert [r["step"] for r in records(two / "rounds/round-1/metrics.jsonl") if "loss" in r] == [1, 2]
    assert "SFT on" in proc.stderr

    one = in_tmp / "one"
    (one / "rounds/round-1").mkdir(parents=True)
    shutil.copy(two / "rounds/round-1/samples.jsonl", one / "rounds/round-1/samples.jsonl")  # read back
    run_recipe(recipe_from_dict(recipe("one", 4)))
    assert (one / "rounds/round-1/sft_train.jsonl").read_text() == (two / "rounds/round-1/sft_train.jsonl").read_text()
    assert_same_weights(one / "final", two / "final")
    r1, r2 = records(one / "metrics.jsonl"), records(two / "metrics.jsonl")
    for key in ("sft_loss", "eval_pass@1", "eval_reward", "eval_length"):  # greedy held-out numbers
        assert [key in r for r in r2] == [key in r for r in r1], key
        assert [r[key] for r in r2 if key in r] == pytest.approx([r[key] for r in r1 if key in r], rel=1e-4), key
