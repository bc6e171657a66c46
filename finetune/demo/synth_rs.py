"""Data for the rejection-sampling and reward-model demonstrations on the quickstart task.

    python -m finetune.demo.synth_rs [--out data/quickstart_rs]

The problems and their train / held-out split are exactly those of finetune.demo.synth (its generator
is replayed with the same seed), so nothing held out there is trained on here:
- prompts_train.jsonl: every training problem in each of the three question styles, with its
  answer (1,530 prompts): what recipes/rs_sft.yaml samples from. Held-out prompts are
  data/quickstart/prompts_eval.jsonl (one style each).
- prompts_eval.jsonl: every held-out problem in each question style (300 prompts): the held-out
  pass@1 of the rejection-sampling, PPO and quickstart-story evaluations. Three phrasings per
  problem cut the noise of a 100-prompt score (standard error ~0.05) and test that the policy
  reads the question rather than one phrasing.
- preference_train.jsonl / preference_eval.jsonl: a prompt, the reply in the SFT format
  ("7 + 5 = 12") as chosen and a reply stating a nearby problem instead, true in itself ("7 + 4 =
  11"), as rejected: one pair per problem and question style (1,530 train, 300 eval).
  Misstated problems are 81% of the quickstart SFT model's wrong samples (the rest state the
  right problem with a wrong result). Measured on the tiny reward model: pairs that differ only
  in the result stay at chance (checking the fact needs the fact), a set with half such pairs
  learns nothing, and misstatements that also carry a wrong result train a weaker model (0.83
  held-out accuracy, 60% of the replies it keeps in rejection sampling right, against 0.98 and
  82% for this set).
Deterministic; tests check the committed files are reproduced exactly.

`fact_reward` is the task's strict verifier, used by recipes/rs_sft.yaml as a `function` reward:
the built-in `numeric` verifier (last number == answer) also passes "1 + 7 = 9" for "What is
2 + 7?", a false fact that rejection sampling would then train on (about 7% of the samples it
keeps at temperature 0.7 from the quickstart SFT model).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from finetune.demo import synth


def quickstart_split(seed: int = 0) -> tuple[list, list]:
    """The (train, held-out) problems of synth.generate(seed), by replaying its random stream."""
    rng = random.Random(seed)
    synth.pretrain_corpus(rng)
    return synth.split_problems(rng)


def prompt_rows(problems: list) -> list[dict]:
    return [{"prompt": style.format(a=a, op=op, b=b), "answer": str(synth.answer(a, op, b))}
            for a, op, b in problems for style in synth.QUESTION_STYLES]


def misstated(rng: random.Random, a: int, op: str, b: int) -> str:
    """A nearby wrong problem (one operand off by 1 to 3) stated with its own true result: the
    quickstart SFT model's usual error, and one only the question can refute."""
    while True:
        d = rng.choice([-3, -2, -1, 1, 2, 3])
        a2, b2 = (a + d, b) if rng.random() < 0.5 else (a, b + d)
        if 0 <= a2 <= synth.MAX_OPERAND and 0 <= b2 <= synth.MAX_OPERAND and (op == "+" or b2 <= a2):
            return f"{a2} {op} {b2} = {synth.answer(a2, op, b2)}"


def preference_rows(rng: random.Random, problems: list, styles: list[str]) -> list[dict]:
    """One pair per problem and question style: the fact restated vs. a misstated problem."""
    return [{"prompt": style.format(a=a, op=op, b=b), "chosen": f"{a} {op} {b} = {synth.answer(a, op, b)}",
             "rejected": misstated(rng, a, op, b)}
            for a, op, b in problems for style in styles]


def fact_reward(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the reply is exactly the prompt's fact restated, "a op b = answer", else 0.0."""
    scores = []
    for prompt, completion, ans in zip(prompts, completions, answer, strict=True):
        problem = re.search(r"(\d+) ([+-]) (\d+)", prompt[-1]["content"])
        want = f"{problem.group(1)} {problem.group(2)} {problem.group(3)} = {ans}" if problem else None
        scores.append(float(" ".join(completion.split()) == want))
    return scores


def generate(out: Path, seed: int = 0) -> dict[str, str]:
    """Writes the files into `out`; returns {file name: content}."""
    train, held_out = quickstart_split(seed)
    rng = random.Random(seed + 1)
    jsonl = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    files = {
        "prompts_train.jsonl": jsonl(prompt_rows(train)),
        "prompts_eval.jsonl": jsonl(prompt_rows(held_out)),
        "preference_train.jsonl": jsonl(preference_rows(rng, train, synth.QUESTION_STYLES)),
        "preference_eval.jsonl": jsonl(preference_rows(rng, held_out, synth.QUESTION_STYLES)),
    }
    return synth.write_files(out, files)


def main() -> None:
    synth.cli(__doc__, generate, "data/quickstart_rs")


if __name__ == "__main__":
    main()
