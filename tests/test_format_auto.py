"""`format: auto` (the default): a source's format is read from the columns of its first rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data.formats import to_conversation, to_preference
from finetune.data.sources import mix_sources, read_texts, with_format
from finetune.errors import DataError
from finetune.recipe.schema import DataSource, recipe_from_dict, recipe_to_dict

U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
ROWS = {
    "messages": [{"messages": [U, A]}, {"messages": [U, A], "id": 2}],
    "prompt_completion": [{"prompt": "hi", "completion": "hello"}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}],
    "alpaca": [{"instruction": "hi", "input": "", "output": "hello"}],
    "prompts": [{"prompt": "What is 2 + 2?", "answer": "4"}],
    "preference": [{"prompt": "hi", "chosen": "hello", "rejected": "go away"}],
    "text": [{"text": "a document"}],
}


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_each_format_is_detected_and_reads_as_if_declared(tmp_path, fmt):
    path = jsonl(tmp_path / "d.jsonl", ROWS[fmt])
    auto = with_format(DataSource(path=path), "data.train.0.path")
    assert auto.format == fmt
    if fmt == "text":
        assert read_texts([DataSource(path=path)], "data.train", 0) == read_texts(
            [DataSource(path=path, format="text")], "data.train", 0)
        return
    convert = to_preference if fmt == "preference" else to_conversation
    got = mix_sources([DataSource(path=path)], "data.train", 0, convert)
    assert got == mix_sources([DataSource(path=path, format=fmt)], "data.train", 0, convert)


def test_txt_files_are_text(tmp_path):
    (tmp_path / "c.txt").write_text("one\n\ntwo\n", encoding="utf-8")
    assert with_format(DataSource(path=str(tmp_path / "c.txt")), "k.path").format == "text"


def test_role_content_turns_under_conversations_are_messages(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"conversations": [U, A]}])
    src = with_format(DataSource(path=path), "k.path")
    assert (src.format, src.columns) == ("messages", {"messages": "conversations"})
    assert mix_sources([DataSource(path=path)], "k", 0, to_conversation)[0].messages == [U, A]


def test_the_trainers_format_wins_among_fitting_ones(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", ROWS["prompt_completion"])
    assert with_format(DataSource(path=path), "k.path").format == "prompt_completion"
    assert with_format(DataSource(path=path), "k.path", expected="prompts").format == "prompts"


def test_column_mapping_is_honoured(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"dialog": [U, A]}])
    assert with_format(DataSource(path=path, columns={"messages": "dialog"}), "k.path").format == "messages"


def test_ambiguous_rows_name_the_candidates_and_the_row(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "doc", "messages": [U, A]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: format auto: the rows fit messages and text "
                                         r"\(columns: messages, text\); set data\.train\.0\.format"):
        with_format(DataSource(path=path), "data.train.0.path")


def test_rows_that_fit_no_format_say_what_each_needs(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"question": "q", "reply": "r"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: format auto: columns question, reply fit no format "
                                         r"\(text: text; messages: messages;"):
        with_format(DataSource(path=path), "data.train.0.path")


def test_rows_that_disagree_are_not_guessed(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", ROWS["messages"] + ROWS["alpaca"])
    with pytest.raises(DataError, match=r"^k\.path: format auto: the first rows fit different formats "
                                         r"\(.*d\.jsonl:1: messages; .*d\.jsonl:3: alpaca\); set k\.format"):
        with_format(DataSource(path=path), "k.path")


def test_a_large_jsonl_is_peeked_not_read(tmp_path):
    # Only the first rows decide: a broken row far down does not stop detection.
    path = tmp_path / "d.jsonl"
    jsonl(path, ROWS["messages"] * 10)
    path.write_text(path.read_text() + "{not json\n", encoding="utf-8")
    assert with_format(DataSource(path=str(path)), "k.path").format == "messages"


def test_auto_is_the_default_and_the_recipe_keeps_it(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", ROWS["messages"])
    recipe = recipe_from_dict({"model": {"name": "org/m"}, "data": {"train": [{"path": path}]},
                               "trainer": {"type": "sft"}, "run": {"output_dir": str(tmp_path / "o")}})
    assert recipe.data.train[0].format == "auto"
    mix_sources(recipe.data.train, "data.train", 0, to_conversation)
    # Reading settles a copy: the resolved recipe (recipe.yaml) still says auto, so it reruns as is.
    assert recipe_to_dict(recipe)["data"]["train"][0]["format"] == "auto"
