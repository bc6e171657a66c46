"""The scaled data path (finetune.data.{stream,cache,sft_data,text_data}) equals the in-memory one.

SFT: samples, labels, counts, bad-row reports, held-out split and packed rows from `sft.prepare`
(parallel workers, Arrow cache, streamed reading) equal `read_conversations` + `encode_conversations`
+ `pack` on multi-turn conversations in four formats and three file kinds. Pretraining: blocks equal
`read_texts` + `split_holdout` + `make_blocks`. Then the cache (a second start encodes nothing; the
template, max_length, train_on or the file changing encodes again), ranks > 0 (they map rank 0's
entry, never encode), a Hub dataset read with `streaming: true`, and packing with a bounded buffer.
"""

from __future__ import annotations

import json
import random

import pytest

from finetune.data import cache, sft_data, stream, text_data
from finetune.data.sources import BadRows, encode_conversations, read_texts, split_holdout
from finetune.errors import DataError
from finetune.recipe.schema import recipe_from_dict
from finetune.train.collate import pack_bins, pack_stream
from finetune.trainers import pretrain, sft
from tests.conftest import write

WORDS = "the a cat dog sees runs fast slow red blue big small one two three four five six seven".split()


def sentence(rng: random.Random, lo: int = 2, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def conversation(rng: random.Random, i: int) -> list[dict]:
    messages = [{"role": "system", "content": sentence(rng)}] if i % 3 == 0 else []
    for turn in range(rng.randint(2, 4)):
        messages.append({"role": "user", "content": f"q{i}.{turn} " + sentence(rng)})
        if i % 5 == 1 and turn == 0:  # a tool call, its result, then the answer
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "look", "arguments": {"q": sentence(rng, 1, 2)}}}]})
            messages.append({"role": "tool", "content": sentence(rng, 1, 3)})
        messages.append({"role": "assistant", "content": sentence(rng, 1, 20)})
    return messages


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts with an empty cache."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from finetune.data.tokenizer import train_bpe_tokenizer

    rng = random.Random(0)
    tok = train_bpe_tokenizer([sentence(rng) for _ in range(300)] + WORDS, vocab_size=400, chat_template="chatml")
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


@pytest.fixture
def files(tmp_path):
    """Multi-turn conversations as messages (JSONL, one bad row of each kind), sharegpt (JSONL),
    alpaca (parquet) and prompt_completion (csv)."""
    import datasets

    rng = random.Random(1)
    rows = [{"messages": conversation(rng, i)} for i in range(40)]
    rows[7] = {"dialog": []}  # no messages column: fails to convert
    rows[12]["messages"][-1]["content"] = "   "  # an empty reply: fails to encode
    write(tmp_path / "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    share = [{"conversations": [{"from": "human" if k % 2 == 0 else "gpt", "value": sentence(rng)}
                                for k in range(2 * rng.randint(1, 3))], "system": sentence(rng)} for _ in range(15)]
    write(tmp_path / "share.jsonl", "".join(json.dumps(r) + "\n\n" for r in share))  # blank lines between rows
    datasets.Dataset.from_list([{"instruction": sentence(rng), "input": sentence(rng) if k % 2 else "",
                                 "output": sentence(rng, 1, 30)} for k in range(12)]).to_parquet(
        str(tmp_path / "alpaca.parquet"))
    datasets.Dataset.from_list([{"prompt": sentence(rng), "completion": sentence(rng)} for _ in range(10)]).to_csv(
        str(tmp_path / "pc.csv"), index=False)
    return tmp_path


def sft_recipe(tok_dir, tmp, train: list[dict], **data) -> dict:
    return {"model": {"name": str(tok_dir)}, "tokenizer": {"chat_template": "chatml", "max_length": 64},
            "data": {"train": train, **data}, "trainer": {"type": "sft"},
            "run": {"output_dir": str(tmp / "out"), "seed": 3}}


def today(recipe, tokenizer):
    """The in-memory path: read_conversations + encode_conversations (+ pack)."""
    bad = BadRows(recipe.data.on_bad_row, recipe.data.max_bad_rows)
    train_convs, eval_convs = sft.read_conversations(recipe, bad)
    t = recipe.tokenizer
    train, stats = encode_conversations(tokenizer, train_convs, recipe.trainer.train_on, t.max_length, t.overflow,
                                        "data.train", bad)
    evals = encode_conversations(tokenizer, eval_convs, recipe.trainer.train_on, t.max_length, t.overflow,
                                 "data.eval", bad)[0] if eval_convs else []
    units = sft.pack(train, t.max_length)[0] if recipe.data.packing else train
    return units, evals, stats, bad.count, train_convs, eval_convs


def assert_same_as_today(recipe):
    prepared = sft.prepare(recipe)
    units, evals, stats, bad_count, train_convs, eval_convs = today(recipe, prepared.tokenizer)
    assert list(prepared.train_units) == units
    assert list(prepared.eval_units) == evals
    assert prepared.train_stats == stats
    assert [c.messages for c in prepared.train_conversations] == [c.messages for c in train_convs]
    assert [c.messages for c in prepared.eval_conversations] == [c.messages for c in eval_convs]
    skipped = [n for n in prepared.notes if n.startswith("skipped ")]
    assert skipped == ([f"skipped {bad_count} bad rows (data.on_bad_row: skip)"] if bad_count else [])
    return prepared, units


def all_formats(files) -> list[dict]:
    return [{"path": str(files / "chat.jsonl"), "format": "messages", "weight": 1.5},
            {"path": str(files / "share.jsonl"), "weight": 0.5},  # format auto
            {"path": str(files / "alpaca.parquet"), "max_samples": 7},
            {"path": str(files / "pc.csv"), "format": "prompt_completion", "weight": 2.0}]


def test_sft_samples_and_packed_rows_equal_todays_in_parallel(tok_dir, files, monkeypatch):
    monkeypatch.setattr(stream, "ROWS_PER_CHUNK", 4)  # many chunks: the worker pool runs
    recipe = recipe_from_dict(sft_recipe(tok_dir, files, all_formats(files), eval_fraction=0.2, packing=True,
                                         on_bad_row="skip", num_proc=2))
    prepared, units = assert_same_as_today(recipe)
    assert any(len(row) > 1 for row in units) and prepared.train_stats.truncated > 0
    assert "data.train.0: 40 rows tokenized (2 processes)" in prepared.notes, prepared.notes
    again = sft.prepare(recipe)  # from the cache: the same again
    assert list(again.train_units) == units and any("rows from the cache" in n for n in again.notes)


@pytest.mark.parametrize("train_on,overflow", [("last_assistant", "drop"), ("completion", "truncate")])
def test_sft_with_eval_sources_and_other_masks_equal_todays(tok_dir, files, train_on, overflow):
    rows = [json.loads(line) for line in (files / "chat.jsonl").read_text().splitlines()]
    write(files / "clean.jsonl", "".join(json.dumps(r) + "\n" for i, r in enumerate(rows) if i not in (7, 12)))
    raw = sft_recipe(tok_dir, files, [{"path": str(files / "clean.jsonl"), "max_samples": 20},
                                      {"path": str(files / "alpaca.parquet")}],
                     eval=[{"path": str(files / "share.jsonl")}], num_proc=1)
    raw["trainer"]["train_on"], raw["tokenizer"]["overflow"] = train_on, overflow
    assert_same_as_today(recipe_from_dict(raw))


def test_a_bad_row_stops_the_build_by_default_and_nothing_is_cached(tok_dir, files):
    recipe = recipe_from_dict(sft_recipe(tok_dir, files, all_formats(files)[:1], num_proc=1))
    with pytest.raises(DataError, match=r"chat.jsonl:8: missing column 'messages'"):
        sft.prepare(recipe)
    assert list(cache.cache_dir().glob("sft-*")) == []


def test_txt_documents_read_in_blocks_equal_reading_it_whole(tmp_path, monkeypatch):
    from finetune.data.sources import _read_txt
    from finetune.recipe.schema import DataSource

    text = "\n\none\ntwo\n\n\n\nthree é\n\n  \n\nfour\n\n\nfive\n" * 3
    path = write(tmp_path / "a.txt", text)
    src = DataSource(path=str(path))
    whole = [(r.data, r.origin) for r in _read_txt(path, src, "k")]
    for block in (1, 2, 3, 7, 64):
        monkeypatch.setattr(stream, "TXT_BLOCK", block)
        assert [(r.data, r.origin) for r in stream._txt_rows(path, src, "k")] == whole


@pytest.fixture
def texts(tmp_path):
    rng = random.Random(2)
    write(tmp_path / "a.txt", "\n\n".join(sentence(rng, 3, 40) for _ in range(30)) + "\n\n\n")
    rows = [{"text": sentence(rng, 1, 50) if k % 7 else "  "} for k in range(40)]  # some blank documents
    write(tmp_path / "b.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def pretrain_recipe(tok_dir, tmp, **data) -> dict:
    return {"model": {"init_config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                      "num_hidden_layers": 1, "num_attention_heads": 2}},
            "tokenizer": {"name": str(tok_dir), "max_length": 48},
            "data": {"train": [{"path": str(tmp / "a.txt")}, {"path": str(tmp / "b.jsonl"), "max_samples": 25}],
                     "num_proc": 1, **data},
            "trainer": {"type": "pretrain"}, "run": {"output_dir": str(tmp / "out"), "seed": 5}}


def count_calls(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_pretraining_blocks_equal_todays_and_a_second_start_tokenizes_nothing(tok_dir, texts, monkeypatch):
    recipe = recipe_from_dict(pretrain_recipe(tok_dir, texts, eval_fraction=0.2))
    calls = count_calls(monkeypatch, text_data, "encode_text")
    counted = count_calls(monkeypatch, text_data, "selected")  # counts a source's rows for max_samples
    p = pretrain.prepare(recipe)
    assert len(counted) == 2
    docs = read_texts(recipe.data.train, "data.train", recipe.run.seed)
    assert len(calls) == len(docs) < 30 + 25  # every non-blank document once (some sampled rows are blank)
    train, held = split_holdout(docs, 0.2, recipe.run.seed)
    blocks, dropped = pretrain.make_blocks(p.tokenizer, [t for t, _ in train], 48)
    assert list(p.train_blocks) == blocks and p.dropped_tokens == dropped
    assert list(p.eval_blocks) == pretrain.make_blocks(p.tokenizer, [t for t, _ in held], 48)[0]
    calls.clear()
    again = pretrain.prepare(recipe)
    assert calls == [] and len(counted) == 2 and list(again.train_blocks) == blocks  # the source is not read
    short = pretrain.prepare(recipe_from_dict(pretrain_recipe(tok_dir, texts) | {"tokenizer": {
        "name": str(tok_dir), "max_length": 100_000}}))  # shorter than one block: one block, no tokenizer call
    assert calls == [] and [b["input_ids"] for b in short.train_blocks] == [
        [t for b in pretrain.make_blocks(p.tokenizer, [t for t, _ in docs], 100_000)[0] for t in b["input_ids"]]]


def test_the_cache_is_hit_and_missed_on_what_decides_the_samples(tok_dir, files, monkeypatch):
    calls = count_calls(monkeypatch, sft_data, "encode_chat_turns")
    raw = sft_recipe(tok_dir, files, [{"path": str(files / "share.jsonl")}], num_proc=1)
    first = sft.prepare(recipe_from_dict(raw))
    assert len(calls) == 15
    entries = lambda: len(list(cache.cache_dir().glob("sft-*/meta.json")))  # noqa: E731
    n = entries()

    def encodes(**change) -> int:
        calls.clear()
        changed = json.loads(json.dumps(raw))
        for key, value in change.items():
            section, name = key.split("__")
            changed[section][name] = value
        sft.prepare(recipe_from_dict(changed))
        return len(calls)

    assert encodes() == 0 and entries() == n  # a hit
    assert list(sft.prepare(recipe_from_dict(raw)).train_units) == list(first.train_units)
    assert encodes(tokenizer__max_length=48) == 15
    assert encodes(trainer__train_on="last_assistant") == 15
    from finetune.data.tokenizer import TEMPLATES_DIR

    chatml = (TEMPLATES_DIR / "chatml.jinja").read_text()
    assert encodes(tokenizer__chat_template=chatml) == 0  # the same template inline: the same key
    assert encodes(tokenizer__chat_template=chatml + "{# changed #}") == 15
    assert entries() == n + 3
    assert encodes(tokenizer__max_length=48) == 0  # each one is kept
    write(files / "share.jsonl", (files / "share.jsonl").read_text() + "\n")  # the file changed
    assert encodes() == 15


class FakeGroup(cache.Group):
    """Rank 1 of 2: what it hears from rank 0 is `status`."""

    def __init__(self, status: str = "ok") -> None:
        super().__init__(rank=1, world=2)
        self.status, self.waited = status, []

    def wait(self, name: str) -> str:
        self.waited.append(name)
        return self.status


def test_other_ranks_wait_then_map_the_main_process_entry(tok_dir, files, monkeypatch):
    raw = sft_recipe(tok_dir, files, [{"path": str(files / "share.jsonl")}], num_proc=1, packing=True)
    announced = []
    monkeypatch.setattr(cache.Group, "announce", lambda self, name, status: announced.append((name, status)))
    main = sft.prepare(recipe_from_dict(raw))  # rank 0 (world 1): builds and announces
    assert [s for _, s in announced] == ["ok"]
    calls = count_calls(monkeypatch, sft_data, "encode_chat_turns")
    group = FakeGroup()
    monkeypatch.setattr(cache, "process_group", lambda: group)
    other = sft.prepare(recipe_from_dict(raw))
    assert calls == [] and group.waited == [announced[0][0]]
    assert list(other.train_units) == list(main.train_units)
    group.status = "error: data.train.0.path: boom"
    with pytest.raises(DataError, match="main process failed to tokenize the data: data.train.0.path: boom"):
        sft.prepare(recipe_from_dict(raw))
    group.status = "ok"
    monkeypatch.setenv("FINETUNE_CACHE", str(files / "node-local-cache"))  # rank 0's entry is not here
    assert list(sft.prepare(recipe_from_dict(raw)).train_units) == list(main.train_units) and len(calls) == 15


def test_main_process_announces_its_failure(tok_dir, files, monkeypatch):
    announced = []
    monkeypatch.setattr(cache.Group, "announce", lambda self, name, status: announced.append(status))
    with pytest.raises(DataError):
        sft.prepare(recipe_from_dict(sft_recipe(tok_dir, files, all_formats(files)[:1], num_proc=1)))
    assert len(announced) == 1 and announced[0].startswith("error: ") and "chat.jsonl:8" in announced[0]


def test_a_hub_dataset_with_streaming_true_is_read_as_a_stream(tok_dir, files, monkeypatch):
    import datasets

    real, seen = datasets.load_dataset, []

    def hub(path, name=None, split=None, revision=None, streaming=False, **kw):  # no network: a local file
        assert path == "someone/chats" and not kw
        ds = real("json", data_files=str(files / "share.jsonl"), split=split, streaming=streaming)
        seen.append(type(ds).__name__)
        return ds

    monkeypatch.setattr(datasets, "load_dataset", hub)
    local = sft.prepare(recipe_from_dict(sft_recipe(tok_dir, files, [{"path": str(files / "share.jsonl")}])))
    streamed = sft.prepare(recipe_from_dict(sft_recipe(tok_dir, files, [{"path": "someone/chats", "streaming": True}])))
    assert set(seen) == {"IterableDataset"} and list(streamed.train_units) == list(local.train_units)
    first = sft.prepare(recipe_from_dict(sft_recipe(tok_dir, files, [
        {"path": "someone/chats", "streaming": True, "max_samples": 4}])))  # a stream's first rows
    assert [c.messages for c in first.train_conversations] == [c.messages for c in local.train_conversations][:4]
    whole = sft.prepare(recipe_from_dict(sft_recipe(tok_dir, files, [{"path": "someone/chats"}])))
    assert "Dataset" in seen and list(whole.train_units) == list(local.train_units)


def test_data_cache_false_keeps_nothing(tok_dir, files):
    before = set(cache.cache_dir().rglob("*")) if cache.cache_dir().exists() else set()
    raw = sft_recipe(tok_dir, files, [{"path": str(files / "pc.csv"), "format": "prompt_completion"}], cache=False)
    p = sft.prepare(recipe_from_dict(raw))
    assert len(p.train_units) == 10 and set(cache.cache_dir().rglob("*")) - before <= {cache.cache_dir() / "tmp"}


def test_packing_a_stream_holds_at_most_one_buffer():
    rng = random.Random(4)
    lengths = [rng.randint(1, 40) for _ in range(103)]
    pulled = []

    def source():
        for n in lengths:
            pulled.append(n)
            yield n

    bins = []
    for b in pack_stream(source(), 48, buffer=10):
        assert len(pulled) - min(b) <= 10 and max(b) < len(pulled)  # never more than a buffer ahead
        bins.append(b)
    expected = [[w + i for i in b] for w in range(0, 103, 10) for b in pack_bins(lengths[w:w + 10], 48)]
    assert bins == expected
    assert list(pack_stream(iter(lengths), 48, buffer=103)) == pack_bins(lengths, 48)  # one buffer: today's


def test_packing_buffer_bounds_the_rows_of_a_prepared_run(tok_dir, files):
    raw = sft_recipe(tok_dir, files, [{"path": str(files / "share.jsonl")}, {"path": str(files / "pc.csv")}],
                     packing=True, packing_buffer=4)
    p = sft.prepare(recipe_from_dict(raw))
    plain = sft.prepare(recipe_from_dict(sft_recipe(tok_dir, files, raw["data"]["train"])))
    assert all(sum(len(s["input_ids"]) for s in row) <= 64 for row in p.train_units)
    flat = [s for row in p.train_units for s in row]
    key = lambda s: json.dumps(s)  # noqa: E731
    assert sorted(map(key, flat)) == sorted(map(key, plain.train_units))
    windows = [list(plain.train_units)[w:w + 4] for w in range(0, len(plain.train_units), 4)]
    assert len(p.train_units) == sum(len(pack_bins([len(s["input_ids"]) for s in w], 64)) for w in windows)
