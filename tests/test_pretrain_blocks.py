"""Pretraining's blocks: documents + EOS in one stream, cut into max_length blocks, the tail dropped,
and the held-out split taken by document before any blocking (no document on both sides)."""

from __future__ import annotations

import json

import pytest

from finetune.data.tokenizer import train_bpe_tokenizer
from finetune.errors import DataError
from finetune.recipe.schema import recipe_from_dict
from finetune.trainers.pretrain import make_blocks, prepare
from tests.conftest import write

# Documents of different lengths, each with a marker no other document holds.
DOCS = [f"doc {i}: " + " ".join(f"{i * j % 17} plus {j}" for j in range(1 + i % 5)) for i in range(24)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(DOCS, vocab_size=300)


def stream_of(tok, docs: list[str]) -> list[int]:
    """The expected stream, built without encode_text: each document's ids, then one EOS."""
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return out


def documents_in(tok, ids: list[int]) -> list[tuple[int, ...]]:
    """The EOS-terminated pieces of a token stream (a trailing piece without EOS is left out)."""
    pieces, cur = [], []
    for t in ids:
        if t == tok.eos_token_id:
            pieces.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return pieces


@pytest.mark.parametrize("length", [7, 16, 33])
def test_blocks_are_the_eos_separated_stream_cut_with_the_tail_dropped(tok, length):
    blocks, dropped = make_blocks(tok, DOCS, length)
    stream = stream_of(tok, DOCS)
    assert all(tok.eos_token_id not in tok(d)["input_ids"] for d in DOCS)  # EOS only as the separator
    assert all(len(b["input_ids"]) == length and b["labels"] == b["input_ids"] for b in blocks)
    joined = [t for b in blocks for t in b["input_ids"]]
    assert len(blocks) == len(stream) // length and dropped == len(stream) % length < length
    assert joined == stream[:len(joined)]  # in order, nothing skipped or repeated but the tail
    # one EOS after every document: the complete pieces are exactly the leading documents
    pieces = documents_in(tok, joined)
    assert pieces == [tuple(tok(d, add_special_tokens=True)["input_ids"]) for d in DOCS[:len(pieces)]]
    assert joined.count(tok.eos_token_id) == len(pieces) >= len(DOCS) - 1 - length // 4


def test_a_stream_of_whole_blocks_drops_nothing_and_a_short_one_is_one_block(tok):
    n = len(stream_of(tok, DOCS[:6]))
    blocks, dropped = make_blocks(tok, DOCS[:6], n)
    assert len(blocks) == 1 and dropped == 0
    blocks, dropped = make_blocks(tok, DOCS[:6], n + 50)  # shorter than one block: kept whole
    assert [b["input_ids"] for b in blocks] == [stream_of(tok, DOCS[:6])] and dropped == 0
    with pytest.raises(DataError, match="fewer than two tokens"):
        make_blocks(tok, [], 8)


def test_held_out_documents_never_reach_a_training_block(in_tmp):
    write(in_tmp / "docs.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    recipe = recipe_from_dict({
        "model": {"init_config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                  "num_hidden_layers": 1, "num_attention_heads": 2}},
        "tokenizer": {"max_length": 16, "train": {"vocab_size": 300}},
        "data": {"train": [{"path": str(in_tmp / "docs.jsonl"), "format": "text"}], "eval_fraction": 0.25},
        "trainer": {"type": "pretrain"},
        "run": {"output_dir": str(in_tmp / "out"), "max_steps": 1},
    })
    p = prepare(recipe)
    tok = p.tokenizer
    whole = {tuple(tok(d, add_special_tokens=True)["input_ids"]): d for d in DOCS}
    train = documents_in(tok, [t for b in p.train_blocks for t in b["input_ids"]])
    held = documents_in(tok, [t for b in p.eval_blocks for t in b["input_ids"]])
    # Every EOS-terminated piece on either side is a whole document (a split of blocks would cut one)
    assert set(train) <= set(whole) and set(held) <= set(whole)
    assert not set(train) & set(held)
    # 6 documents held out; each side's blocking drops its own tail, so each may lose its last one
    assert round(len(DOCS) * 0.25) - 1 <= len(held) <= round(len(DOCS) * 0.25)
    assert len(train) + len(held) >= len(DOCS) - 2
    assert p.dropped_tokens < 16 and p.train_tokens == 16 * len(p.train_blocks)
