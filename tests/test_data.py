"""Reading sources: file kinds, origins in errors, mixing weights, held-out splits."""

from __future__ import annotations

import json

import pytest

from finetune.data.sources import mix_sources, read_source, read_texts, split_holdout
from finetune.errors import DataError
from finetune.recipe.schema import DataSource
from tests.conftest import write


def test_txt_documents_are_blank_line_separated(tmp_path):
    write(tmp_path / "a.txt", "one\ntwo\n\nthree\n\n\nfour\n")
    rows = read_source(DataSource(path=str(tmp_path / "a.txt")), "k")
    assert [r.data["text"] for r in rows] == ["one\ntwo", "three", "four"]
    assert rows[1].origin.endswith("a.txt:4")


def test_directory_and_glob_sources(tmp_path, monkeypatch):
    write(tmp_path / "d" / "x.jsonl", json.dumps({"text": "a"}) + "\n")
    write(tmp_path / "d" / "y.jsonl", json.dumps({"text": "b"}) + "\n")
    assert len(read_source(DataSource(path=str(tmp_path / "d")), "k")) == 2
    monkeypatch.chdir(tmp_path)
    assert len(read_source(DataSource(path="d/*.jsonl"), "k")) == 2


def test_json_list_and_parquet(tmp_path):
    write(tmp_path / "a.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert len(read_source(DataSource(path=str(tmp_path / "a.json")), "k")) == 2
    import datasets

    datasets.Dataset.from_list([{"text": "p"}, {"text": "q"}]).to_parquet(str(tmp_path / "a.parquet"))
    assert [r.data["text"] for r in read_source(DataSource(path=str(tmp_path / "a.parquet")), "k")] == ["p", "q"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": "a"}\n\n[1, 2]\n')
    with pytest.raises(DataError, match=r"a.jsonl:3: expected a JSON object"):
        read_source(DataSource(path=str(tmp_path / "a.jsonl")), "k")


def test_non_string_text_names_row(tmp_path):
    write(tmp_path / "a.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match=r"a.jsonl:1: column 'text' must be a string"):
        read_texts([DataSource(path=str(tmp_path / "a.jsonl"))], "data.train", 0)


def test_offline_hub_dataset_is_a_clear_error():
    with pytest.raises(DataError, match=r"cannot load Hub dataset 'someone/nothing-here'"):
        read_source(DataSource(path="someone/nothing-here"), "data.train.0.path")


def test_mixing_weights_scale_rows(tmp_path):
    write(tmp_path / "a.jsonl", "".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(10)))
    write(tmp_path / "b.jsonl", "".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(10)))
    sources = [DataSource(path=str(tmp_path / "a.jsonl"), weight=2.0),
               DataSource(path=str(tmp_path / "b.jsonl"), weight=0.5)]
    rows = mix_sources(sources, "data.train", 0, lambda row, src: row.data["text"])
    assert sum(r.startswith("a") for r in rows) == 20 and sum(r.startswith("b") for r in rows) == 5
    assert len(set(r for r in rows if r.startswith("b"))) == 5


def test_holdout_is_seeded_and_disjoint():
    train, held = split_holdout(list(range(100)), 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_holdout(list(range(100)), 0.1, seed=3) == (train, held)
