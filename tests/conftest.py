"""Shared fixtures: everything offline, tiny models from configs, data written into tmp dirs."""

from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest

# No test may reach the Hub: fail fast instead of hanging on a download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tokenized-data cache of the test session only: never the user's, never stale across sessions.
os.environ["FINETUNE_CACHE"] = tempfile.mkdtemp(prefix="finetune-cache-")

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per process a test starts): two workers on two cores
    # otherwise oversubscribe them, and tiny models gain nothing from intra-op threads. The
    # quickstart story runs so too (its numbers measured the same at 1 and 2 threads, 2026-11-30).
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


# Files in the order make test's two workers should take them: the story first, then the longest
# (ranked by --durations, 2026-11-30), so the short files fill the end and both workers finish together.
LONGEST_FIRST = ("test_quickstart", "test_ppo.py", "test_grpo", "test_families", "test_launch.py", "test_fsdp.py",
                 "test_reliability", "test_gpu_check", "test_launch_trainers", "test_fsdp_adapter", "test_memory",
                 "test_scaleout", "test_merge", "test_rs_sft", "test_dpo", "test_distill", "test_data_pipeline")


def pytest_collection_modifyitems(config, items):
    """With `-n 2 --dist loadfile` each worker takes the next file in this order when it is free."""
    def rank(item) -> int:
        return next((i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: within a file, and among the rest, collection order stays


# The story (tests/test_quickstart.py) is the longest file by far: it starts first, on one worker at
# one thread, and the other worker runs every other file meanwhile (about half the story's time).
# The worker that runs out of files tells the story's process, which then takes both cores: SIGUSR1,
# whose Python handler runs in the main thread (torch's thread count is the calling thread's).
def story_pid_file() -> Path | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # the same in every worker of one run
    return Path(tempfile.gettempdir()) / f"finetune-story-{run}.pid" if run else None


def pytest_sessionfinish(session):
    path = story_pid_file()
    try:
        pid = int(path.read_text()) if path else None
    except (OSError, ValueError):
        return
    if pid and pid != os.getpid():
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def both_cores_once_the_other_worker_is_done():
    """For the story's module fixture (under xdist only; a plain run keeps its thread count)."""
    import torch

    path = story_pid_file()
    if path is None:
        yield
        return
    # Installed for the rest of the process: a signal sent as the story ends must not kill the worker.
    signal.signal(signal.SIGUSR1, lambda *_: torch.set_num_threads(2))
    path.write_text(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside a temp dir (relative recipe paths resolve there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order (losses, evals, rounds, updates)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def read_losses(run_dir: Path) -> list[float]:
    """The training loss of every logged step."""
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, for a rendezvous (released before it is returned)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY_LLAMA = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
}


def tiny_pretrain_recipe(tmp: Path, **run) -> dict:
    """A from-scratch pretraining recipe on a few KB of generated text."""
    corpus = "\n\n".join(
        "\n".join(f"{a} + {b} = {a + b}" for b in range(6)) for a in range(12)
    )
    write(tmp / "corpus.txt", corpus + "\n")
    return {
        "model": {"init_config": dict(TINY_LLAMA)},
        "tokenizer": {"max_length": 32, "chat_template": "chatml", "train": {"vocab_size": 300}},
        "data": {"train": [{"path": str(tmp / "corpus.txt"), "format": "text"}]},
        "trainer": {"type": "pretrain"},
        "optim": {"lr": 3e-3, "max_grad_norm": 1.0},
        "run": {"output_dir": str(tmp / "out"), "max_steps": 6, "micro_batch_size": 4, "log_every": 1,
                "seed": 1, **run},
    }


def save_tiny_chat_model(path: Path, texts: list[str] | None = None, **config) -> Path:
    """A tiny random Llama + BPE tokenizer with the ChatML template, saved like a Hub model;
    `config` overrides TINY_LLAMA (e.g. tie_word_embeddings=True)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.data.tokenizer import train_bpe_tokenizer

    texts = texts or [f"What is {a} + {b}? {a} + {b} = {a + b}" for a in range(20) for b in range(20)]
    tok = train_bpe_tokenizer(texts, vocab_size=320, chat_template="chatml")
    cfg = {**TINY_LLAMA, **config}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        cfg.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def crash_after_checkpoint(monkeypatch, step: int) -> None:
    """The next run dies (KeyboardInterrupt, as if killed) right after writing checkpoints/step-<step>;
    later runs save normally."""
    from finetune.train import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        if path.name == f"step-{step}":
            monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)


def tiny_llama(seed: int | None = 0, **config):
    """A randomly initialised TINY_LLAMA in memory; `config` overrides (vocab_size, tie_word_embeddings ...)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_LLAMA, **config}
    if seed is not None:
        torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def save_tiny_reward_model(path: Path, base: Path, tokenizer=None) -> Path:
    """A reward-model dir as `trainer.type: reward` writes one: base's backbone under a fresh
    one-label score head (seed 0), the pad id set, the tokenizer beside it. Given another tokenizer
    (another vocabulary), the backbone is built fresh from base's config instead."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tok = tokenizer or AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    if tokenizer is None:
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    else:
        config = AutoConfig.from_pretrained(base, num_labels=1)
        config.vocab_size = len(tok)
        model = AutoModelForSequenceClassification.from_config(config)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_sft_recipe(tmp: Path, model_dir: Path, **run) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "tokenizer": {"chat_template": "chatml", "max_length": 64},
        "data": {"train": [{"path": str(ROOT / "data/quickstart/sft_train.jsonl"), "format": "messages",
                            "max_samples": 48}],
                 "eval": [{"path": str(ROOT / "data/quickstart/sft_eval.jsonl"), "format": "messages",
                           "max_samples": 8}]},
        "trainer": {"type": "sft", "exact_match_samples": 4, "max_new_tokens": 8},
        "optim": {"lr": 3e-3},
        "run": {"output_dir": str(tmp / "sft"), "max_steps": 8, "micro_batch_size": 8, "log_every": 1, **run},
    }
