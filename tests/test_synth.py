"""The committed quickstart data is exactly what the generator produces."""

from __future__ import annotations

import json

from finetune.demo import synth
from tests.conftest import ROOT


def test_generator_reproduces_committed_files(tmp_path):
    files = synth.generate(tmp_path)
    for name, content in files.items():
        assert (ROOT / "data" / "quickstart" / name).read_text(encoding="utf-8") == content, name


def test_answers_are_correct_and_splits_disjoint(tmp_path):
    synth.generate(tmp_path)
    rows = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    train = {r["prompt"] for r in rows("prompts_train.jsonl")}
    held = rows("prompts_eval.jsonl")
    for r in held:
        a, op, b = r["prompt"].replace("What is ", "").replace("Compute ", "").rstrip("?.= ").split()[:3]
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    # the same problem may be phrased differently; compare the numbers
    key = lambda p: tuple(x for x in p.replace("?", " ").replace(".", " ").split() if x.isdigit() or x in "+-")  # noqa: E731
    assert not {key(p) for p in train} & {key(r["prompt"]) for r in held}
    for r in rows("preference_train.jsonl"):
        assert r["chosen"] != r["rejected"]
