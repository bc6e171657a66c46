"""The quickstart's synthetic language, generated deterministically into data/quickstart/.

A tiny model can learn it in minutes on a CPU, and it has checkable answers, so every later
stage (SFT, rejection sampling, PPO) can show a measurable gain on the same task:
  - arithmetic facts over small numbers ("7 + 5 = 12", "9 - 4 = 5") — pretraining learns them
    only partly in the quickstart's budget, leaving room for the later stages;
  - templated sentences from a small grammar ("the red fox sees a small dog .").

    python -m finetune.demo.synth [--out data/quickstart]

The generated files are committed; tests check that this module reproduces them exactly.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MAX_OPERAND = 19
ADJECTIVES = ["red", "blue", "green", "small", "big", "old", "young", "quick", "lazy", "happy"]
NOUNS = ["fox", "dog", "cat", "bird", "fish", "child", "farmer", "king", "robot", "tree"]
VERBS = ["sees", "likes", "follows", "helps", "finds", "calls", "watches", "meets"]
QUESTION_STYLES = ["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"]


def all_problems() -> list[tuple[int, str, int]]:
    """Every (a, op, b) of the language: additions, and subtractions with a non-negative result."""
    adds = [(a, "+", b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]
    subs = [(a, "-", b) for a in range(MAX_OPERAND + 1) for b in range(a + 1)]
    return adds + subs


def answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def fact(a: int, op: str, b: int) -> str:
    return f"{a} {op} {b} = {answer(a, op, b)}"


def sentence(rng: random.Random) -> str:
    det = lambda: rng.choice(["the", "a"])  # noqa: E731 - tiny local helper
    return (f"{det()} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"{det()} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} .")


def pretrain_corpus(rng: random.Random, n_docs: int = 1500, lines_per_doc: int = 12) -> str:
    """Documents of mixed facts and sentences, separated by blank lines (the .txt convention)."""
    problems = all_problems()
    docs = []
    for _ in range(n_docs):
        lines = [fact(*rng.choice(problems)) if rng.random() < 0.9 else sentence(rng)
                 for _ in range(lines_per_doc)]
        docs.append("\n".join(lines))
    return "\n\n".join(docs) + "\n"


def split_problems(rng: random.Random, n_eval: int = 100) -> tuple[list, list]:
    problems = all_problems()
    rng.shuffle(problems)
    return problems[n_eval:], problems[:n_eval]


def question(rng: random.Random, a: int, op: str, b: int) -> str:
    return rng.choice(QUESTION_STYLES).format(a=a, op=op, b=b)


def chat_rows(rng: random.Random, problems: list) -> list[dict]:
    """SFT conversations: one or two question/answer turns.

    The reply restates the fact ("7 + 5 = 12"): SFT then teaches the chat format and reuses what
    pretraining stored, instead of a new question -> number mapping a tiny model learns slowly.
    """
    rows = []
    for a, op, b in problems:
        messages = [{"role": "user", "content": question(rng, a, op, b)},
                    {"role": "assistant", "content": fact(a, op, b)}]
        if rng.random() < 0.3:  # some multi-turn rows, so masks over several turns are exercised
            a2, op2, b2 = rng.choice(problems)
            messages += [{"role": "user", "content": question(rng, a2, op2, b2)},
                         {"role": "assistant", "content": fact(a2, op2, b2)}]
        rows.append({"messages": messages})
    return rows


def prompt_rows(rng: random.Random, problems: list) -> list[dict]:
    """Prompts with checkable answers (the number), for rejection sampling, PPO and eval."""
    return [{"prompt": question(rng, a, op, b), "answer": str(answer(a, op, b))} for a, op, b in problems]


def preference_rows(rng: random.Random, problems: list) -> list[dict]:
    """Correct vs. incorrect answers, for a reward model."""
    rows = []
    for a, op, b in problems:
        right = answer(a, op, b)
        delta = rng.choice([1, 2, 3])
        wrong = right - delta if right - delta >= 0 and rng.random() < 0.5 else right + delta
        rows.append({"prompt": question(rng, a, op, b), "chosen": str(right), "rejected": str(wrong)})
    return rows


def generate(out: Path, seed: int = 0) -> dict[str, str]:
    """Writes every quickstart file into `out`; returns {file name: content}."""
    rng = random.Random(seed)
    files: dict[str, str] = {"pretrain.txt": pretrain_corpus(rng)}
    train, held_out = split_problems(rng)
    jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    files["sft_train.jsonl"] = jsonl(chat_rows(rng, train))
    files["sft_eval.jsonl"] = jsonl(chat_rows(rng, held_out))
    files["prompts_train.jsonl"] = jsonl(prompt_rows(rng, train))
    files["prompts_eval.jsonl"] = jsonl(prompt_rows(rng, held_out))
    files["preference_train.jsonl"] = jsonl(preference_rows(rng, train))
    files["preference_eval.jsonl"] = jsonl(preference_rows(rng, held_out))
    return write_files(out, files)


def write_files(out: Path, files: dict[str, str]) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_text(content, encoding="utf-8")
    return files


def cli(doc: str, generate_fn, default_out: str) -> None:
    """`python -m finetune.demo.synth` / `finetune.demo.synth_rs`: [--out DIR] [--seed N], a line per file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, content in generate_fn(Path(args.out), args.seed).items():
        print(f"{args.out}/{name}: {content.count(chr(10))} lines")


def main() -> None:
    cli(__doc__, generate, "data/quickstart")


if __name__ == "__main__":
    main()
