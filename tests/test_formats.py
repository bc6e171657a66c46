"""Row formats -> Conversation / PreferencePair: exact conversions and errors that name the row."""

from __future__ import annotations

import pytest

from finetune.data.formats import FORMAT_COLUMNS, Conversation, PreferencePair, to_conversation, to_preference
from finetune.data.sources import Row
from finetune.errors import DataError
from finetune.recipe.schema import DATA_FORMATS, DataSource

ORIGIN = "data/x.jsonl:12"
U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def convert(fmt: str, data: dict, **columns: str) -> Conversation:
    return to_conversation(Row(data, ORIGIN), DataSource(path="x.jsonl", format=fmt, columns=columns))


def pair(data: dict, **columns: str) -> PreferencePair:
    return to_preference(Row(data, ORIGIN), DataSource(path="x.jsonl", format="preference", columns=columns))


def rejects(fn, *args, must_say: tuple[str, ...] = (), **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert msg.startswith(f"{ORIGIN}: "), msg
    for fragment in must_say:
        assert fragment in msg, msg
    return msg


def test_every_recipe_format_has_columns():
    assert set(FORMAT_COLUMNS) == set(DATA_FORMATS)


# ---------------------------------------------------------------- conversions


def test_messages_with_tools_tool_calls_and_extra():
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1}}}
    msgs = [U, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "2", "name": "add", "tool_call_id": "c1"}, A]
    tools = [{"type": "function", "function": {"name": "add"}}]
    conv = convert("messages", {"messages": msgs, "tools": tools, "id": 7})
    assert conv == Conversation(msgs, ORIGIN, tools, {"id": 7})
    assert conv.messages[0] is not U  # copies: normalising never edits the dataset's rows


def test_messages_drops_none_keys_filled_in_by_arrow():
    msgs = [{"role": "user", "content": "hi", "tool_calls": None, "name": None}, A]
    assert convert("messages", {"messages": msgs}).messages == [U, A]


def test_tools_as_json_string():
    conv = convert("messages", {"messages": [U, A], "tools": '[{"name": "add"}]'})
    assert conv.tools == [{"name": "add"}]


def test_column_mapping():
    conv = convert("messages", {"dialog": [U, A], "functions": [], "messages": "unrelated"},
                   messages="dialog", tools="functions")
    assert conv.messages == [U, A] and conv.tools == [] and conv.extra == {"messages": "unrelated"}
    conv = convert("alpaca", {"q": "Add", "a": "3"}, instruction="q", output="a")
    assert conv.messages == [{"role": "user", "content": "Add"}, {"role": "assistant", "content": "3"}]


def test_prompt_completion_strings_and_system():
    conv = convert("prompt_completion", {"prompt": "hi", "completion": "hello", "system": "Be brief."})
    assert conv.messages == [{"role": "system", "content": "Be brief."}, U, A]
    assert conv.extra == {}


def test_prompt_completion_message_lists():
    sys = {"role": "system", "content": "S"}
    conv = convert("prompt_completion", {"prompt": [sys, U], "completion": [A]})
    assert conv.messages == [sys, U, A]


def test_sharegpt_maps_every_speaker():
    turns = [("system", "system"), ("human", "user"), ("gpt", "assistant"), ("user", "user"),
             ("function_call", "assistant"), ("observation", "tool"), ("Model", "assistant"),
             ("function", "tool"), ("chatgpt", "assistant"), ("tool", "tool"), ("bing", "assistant"),
             ("bard", "assistant"), ("assistant", "assistant")]
    conv = convert("sharegpt", {"conversations": [{"from": f, "value": f"v{i}"} for i, (f, _) in enumerate(turns)]})
    assert conv.messages == [{"role": r, "content": f"v{i}"} for i, (_, r) in enumerate(turns)]


def test_sharegpt_system_column():
    conv = convert("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                                "system": "S"})
    assert conv.messages == [{"role": "system", "content": "S"}, U, A]


def test_reasoning_is_kept_through_every_format():
    # The reasoning-template fields (finetune.data.reasoning) survive each format as given.
    R = {"reasoning_content": "think"}
    assert convert("messages", {"messages": [U, A | R]}).messages == [U, A | R]
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello", "thinking": "think"}]
    assert convert("sharegpt", {"conversations": turns}).messages == [U, A | {"thinking": "think"}]
    pc = convert("prompt_completion", {"prompt": "hi", "completion": "hello", **R})
    assert pc.messages == [U, A | R] and pc.extra == {}
    assert convert("alpaca", {"instruction": "hi", "output": "hello", **R}).messages == [U, A | R]
    inline = {"role": "assistant", "content": "<think>\nthink\n</think>\n\nhello"}
    assert convert("prompt_completion", {"prompt": [U], "completion": [inline]}).messages == [U, inline]
    rejects(convert, "alpaca", {"instruction": "hi", "output": "x", "thinking": 3}, must_say=("'thinking'", "string"))
    rejects(convert, "messages", {"messages": [U, A | {"reasoning_content": ["x"]}]},
            must_say=("messages[1]", "reasoning_content must be a string"))


def test_alpaca_with_and_without_input():
    conv = convert("alpaca", {"instruction": "Add", "input": "1 2", "output": "3", "system": "S"})
    assert conv.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add\n\n1 2"},
                             {"role": "assistant", "content": "3"}]
    for empty in ({"input": ""}, {"input": None}, {}):
        conv = convert("alpaca", {"instruction": "Add", "output": "3", **empty})
        assert conv.messages == [{"role": "user", "content": "Add"}, {"role": "assistant", "content": "3"}]
        assert conv.extra == {}


def test_prompts_keep_answer_in_extra():
    conv = convert("prompts", {"prompt": "2+2?", "answer": "4", "level": 1})
    assert conv == Conversation([{"role": "user", "content": "2+2?"}], ORIGIN, None, {"answer": "4", "level": 1})
    assert convert("prompts", {"prompt": [U], "answer": "x"}).messages == [U]  # no assistant turn needed


def test_preference_explicit_prompt_and_margin():
    p = pair({"prompt": "hi", "chosen": "hello", "rejected": "go away", "margin": 2})
    assert p == PreferencePair([U], [A], [{"role": "assistant", "content": "go away"}], 2.0, ORIGIN)
    assert type(p.margin) is float  # an int column becomes a plain float
    assert pair({"prompt": [U], "chosen": [A], "rejected": [A]}).margin is None


def test_preference_implicit_prompt_split():
    a2 = {"role": "assistant", "content": "no"}
    u2 = {"role": "user", "content": "again"}
    p = pair({"chosen": [U, A, u2, A], "rejected": [U, A, u2, a2]})
    assert (p.prompt, p.chosen, p.rejected) == ([U, A, u2], [A], [a2])


def test_preference_string_prompt_beside_full_conversations():
    # HuggingFaceH4/ultrafeedback_binarized: the responses repeat the prompt; TRL splits their prefix.
    a2 = {"role": "assistant", "content": "no"}
    p = pair({"prompt": "hi", "chosen": [U, A], "rejected": [U, a2]})
    assert (p.prompt, p.chosen, p.rejected) == ([U], [A], [a2])


# ---------------------------------------------------------------- errors name the row and the problem


def test_text_is_not_a_conversation():
    rejects(convert, "text", {"text": "doc"}, must_say=("'text'", "conversations"))


def test_missing_column_names_expected_and_present():
    rejects(convert, "messages", {"dialog": [U, A]}, must_say=("'messages'", "present: dialog"))
    rejects(convert, "prompt_completion", {"prompt": "hi"}, must_say=("'completion'",))
    rejects(pair, {"chosen": [U, A]}, must_say=("'rejected'",))


@pytest.mark.parametrize("fmt,data,must_say", [
    ("prompt_completion", {"prompt": 3, "completion": "x"}, ("prompt", "string or a list", "int")),
    ("prompt_completion", {"prompt": "hi", "completion": ""}, ("completion", "empty")),
    ("alpaca", {"instruction": "Add", "output": "  "}, ("output", "empty")),
    ("alpaca", {"instruction": "Add", "input": 3, "output": "3"}, ("input", "string")),
    ("messages", {"messages": "hi"}, ("messages", "list")),
    ("messages", {"messages": [U, "hello"]}, ("messages[1]", "dict", "str")),
    ("messages", {"messages": [U, {"role": "assistant", "content": 5}]}, ("messages[1]", "string", "int")),
    ("messages", {"messages": [{"role": "user", "content": None}, A]}, ("messages[0]", "string", "NoneType")),
    ("messages", {"messages": [U, {"role": "assistant", "content": None}]}, ("messages[1]", "string")),
    ("messages", {"messages": [U, {"role": "user", "content": "x", "tool_calls": []}, A]}, ("tool_calls",)),
    ("messages", {"messages": []}, ("empty conversation",)),
    ("messages", {"messages": [{"role": "human", "content": "hi"}, A]}, ("'human'", "format: sharegpt", "'user'")),
    ("messages", {"messages": [U, {"role": "gpt", "content": "x"}]}, ("'gpt'", "format: sharegpt")),
    ("messages", {"messages": [U, {"role": "narrator", "content": "x"}]}, ("'narrator'", "allowed: system")),
    ("messages", {"messages": [{"from": "human", "value": "hi"}]}, ("'from'", "format: sharegpt")),
    ("messages", {"messages": [U]}, ("no assistant message",)),
    ("messages", {"messages": [U, A], "tools": {"name": "add"}}, ("tools", "list")),
    ("messages", {"messages": [U, A], "tools": "{oops"}, ("tools", "JSON")),
    ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}]}, ("no assistant message",)),
    ("sharegpt", {"conversations": [{"from": "robot", "value": "x"}]}, ("conversations[0]", "'robot'")),
    ("sharegpt", {"conversations": [U, A]}, ("conversations[0]", "format: messages")),
    ("sharegpt", {"conversations": []}, ("empty conversation",)),
    ("alpaca", {"instruction": "Add", "output": "3", "system": 1}, ("system", "string")),
    ("prompt_completion", {"prompt": [{"role": "system", "content": "A"}, U], "completion": "x", "system": "B"},
     ("system",)),
    ("prompt_completion", {"prompt": [U], "completion": [U]}, ("no assistant message",)),
    ("prompts", {"prompt": []}, ("prompt", "empty")),
])
def test_bad_rows(fmt, data, must_say):
    rejects(convert, fmt, data, must_say=must_say)


def test_tool_call_turn_may_have_no_content():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    conv = convert("messages", {"messages": [U, {"role": "assistant", "content": None, "tool_calls": [call]}]})
    assert conv.messages[1] == {"role": "assistant", "content": None, "tool_calls": [call]}


def test_preference_is_not_one_conversation():
    rejects(convert, "preference", {"chosen": [U, A], "rejected": [U, A]}, must_say=("preference",))


@pytest.mark.parametrize("data,must_say", [
    ({"chosen": "hello", "rejected": "no"}, ("prompt column", "message lists")),
    ({"chosen": [U, A], "rejected": [{"role": "user", "content": "other"}, A]}, ("share no",)),
    ({"chosen": [U, A], "rejected": [U, A]}, ("no response",)),
    ({"chosen": [U, A], "rejected": [U, U]}, ("rejected has no assistant",)),
    ({"prompt": "hi", "chosen": "hello", "rejected": ""}, ("rejected", "empty")),
    ({"prompt": "hi", "chosen": "hello", "rejected": "no", "margin": "big"}, ("margin", "number", "str")),
    ({"prompt": 1, "chosen": "hello", "rejected": "no"}, ("prompt", "string or a list")),
])
def test_bad_preference_rows(data, must_say):
    rejects(pair, data, must_say=must_say)
