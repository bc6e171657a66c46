"""Row formats: one row of a declared format -> one normalised record.

Each source's format is declared (``data.train[i].format``) or, with ``auto`` (the default), read from
the columns of its first rows (``finetune.data.sources.detect_format``).
Every format except ``text`` becomes a ``Conversation`` (``to_conversation``), or for preference
data a ``PreferencePair`` (``to_preference``). Column names are logical: map them to your
dataset's own with ``columns: {messages: dialog}``.

| format              | required columns              | optional           | becomes                            |
|---------------------|-------------------------------|--------------------|------------------------------------|
| `text`              | `text`                        |                    | a pretraining document, not a chat |
| `messages`          | `messages` (role, content)    | `tools`            | the messages as given              |
| `prompt_completion` | `prompt`, `completion`        | `system`           | prompt + completion (1)            |
| `sharegpt`          | `conversations` (from, value) | `system`, `tools`  | messages with roles mapped (2)     |
| `alpaca`            | `instruction`, `output`       | `input`, `system`  | user + assistant message (3)       |
| `prompts`           | `prompt`                      | `system`           | the prompt only, for sampling (4)  |
| `preference`        | `chosen`, `rejected`          | `prompt`, `margin` | a PreferencePair (5)               |

(1) A string prompt is one user message, a string completion one assistant message; either may
    instead be a list of messages (TRL's conversational prompt/completion).
(2) from human/user -> user; gpt/assistant/model/chatgpt/bing/bard -> assistant; function_call ->
    assistant (its value as content); system -> system; tool/function/observation -> tool.
(3) The user message is instruction + "\\n\\n" + input when input is non-empty, else instruction;
    the assistant message is output.
(4) For rejection sampling, PPO and eval: no assistant turn needed; every other column (e.g. an
    `answer` a verifier checks) is kept in `Conversation.extra`.
(5) prompt, chosen and rejected are strings or message lists. Without a prompt column (or with a
    string prompt beside message-list responses, TRL's rule) chosen and rejected are full
    conversations and the messages they share from the start are the prompt.

Roles are system, user, assistant and tool; an assistant message may carry ``tool_calls`` (then
its content may be None). Reasoning is kept through every format, as the field the chat template
reads (``finetune.data.reasoning``): inline ``<think>...</think>`` content, or a string
``reasoning_content`` / ``thinking`` key on messages and ShareGPT turns, or a ``reasoning_content``
/ ``thinking`` column beside a string completion (prompt_completion) or ``output`` (alpaca).
Columns a format does not read stay in ``extra``. Every error names the row ("data/x.jsonl:12: ...").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from finetune.data.reasoning import REASONING_FIELDS
from finetune.data.sources import FORMAT_COLUMNS, Row, column
from finetune.data.tokenizer import ROLES
from finetune.errors import DataError
from finetune.recipe.schema import DataSource

# ShareGPT speaker names -> roles. function_call is the assistant calling a tool (kept as content).
SHAREGPT_ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bing": "assistant", "bard": "assistant", "function_call": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "observation": "tool",
}


@dataclass
class Conversation:
    messages: list[dict]
    origin: str
    tools: list | None = None
    extra: dict = field(default_factory=dict)  # the row's other columns, e.g. `answer` for a verifier


@dataclass
class PreferencePair:
    prompt: list[dict]
    chosen: list[dict]  # the responses only: prompt + chosen is the full conversation
    rejected: list[dict]
    margin: float | None
    origin: str


def to_conversation(row: Row, src: DataSource) -> Conversation:
    """The conversation in one row of ``src.format``; DataError naming the row when it is malformed."""
    if src.format == "text":
        raise DataError(f"{row.origin}: format 'text' rows are documents, but this trainer reads "
                        f"conversations (use messages, prompt_completion, sharegpt, alpaca or prompts)")
    if src.format == "preference":
        raise DataError(f"{row.origin}: format 'preference' rows are chosen/rejected pairs, but this "
                        f"trainer reads single conversations (preference data is for trainer: reward)")
    convert = _CONVERTERS.get(src.format)
    if convert is None:
        raise DataError(f"{row.origin}: unknown format {src.format!r} (known: {', '.join(FORMAT_COLUMNS)})")
    messages, tools, read = convert(row, src)
    if not messages:
        raise DataError(f"{row.origin}: empty conversation")
    if src.format != "prompts" and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{row.origin}: no assistant message to train on")
    return Conversation(messages, row.origin, tools, _extra(row, src, read))


def to_preference(row: Row, src: DataSource) -> PreferencePair:
    """A chosen/rejected pair; message lists without a separate prompt are split at their shared prefix."""
    chosen, rejected = column(row, src, "chosen"), column(row, src, "rejected")
    prompt = _optional(row, src, "prompt")
    # TRL's convention: a string prompt beside conversational responses means the responses repeat
    # the prompt (HuggingFaceH4/ultrafeedback_binarized), so the prompt comes from their prefix.
    if prompt is None or (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)):
        prompt, chosen, rejected = _split_prefix(row, chosen, rejected)
    else:
        prompt = _turns(row, prompt, "user", "prompt")
        chosen = _turns(row, chosen, "assistant", "chosen")
        rejected = _turns(row, rejected, "assistant", "rejected")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["role"] == "assistant" for m in reply):
            raise DataError(f"{row.origin}: {name} has no assistant message")
    margin = _optional(row, src, "margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
        raise DataError(f"{row.origin}: column 'margin' must be a number, got {type(margin).__name__}")
    return PreferencePair(prompt, chosen, rejected, None if margin is None else float(margin), row.origin)


# ---------------------------------------------------------------- one function per format
# Each returns (messages, tools, logical columns read); to_conversation does the shared checks.


def _from_messages(row: Row, src: DataSource):
    return _messages(row, column(row, src, "messages"), "messages"), _tools(row, src), ("messages", "tools")


def _from_prompt_completion(row: Row, src: DataSource):
    prompt = _turns(row, column(row, src, "prompt"), "user", "prompt")
    raw = column(row, src, "completion")
    completion = _turns(row, raw, "assistant", "completion")
    if isinstance(raw, str):
        completion[0].update(_reasoning_columns(row, src))
    return _system(row, src, prompt) + completion, None, ("prompt", "completion", "system", *REASONING_FIELDS)


def _from_sharegpt(row: Row, src: DataSource):
    turns = column(row, src, "conversations")
    if not isinstance(turns, list):
        raise DataError(f"{row.origin}: column 'conversations' must be a list of {{from, value}}, "
                        f"got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            hint = " (role/content messages: use format: messages)" if isinstance(turn, dict) and "role" in turn else ""
            raise DataError(f"{row.origin}: conversations[{i}] must be a dict with 'from' and 'value'{hint}")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(f"{row.origin}: conversations[{i}]: unknown 'from' value {speaker!r} "
                            f"(known: {', '.join(SHAREGPT_ROLES)})")
        kept = {k: turn[k] for k in REASONING_FIELDS if turn.get(k) is not None}
        messages.append({"role": role, "content": turn["value"], **kept})
    messages = _messages(row, messages, "conversations")
    return _system(row, src, messages), _tools(row, src), ("conversations", "system", "tools")


def _from_alpaca(row: Row, src: DataSource):
    instruction = _text(row, column(row, src, "instruction"), "instruction")
    extra_input = _optional(row, src, "input")
    if extra_input is not None and not isinstance(extra_input, str):
        raise DataError(f"{row.origin}: column 'input' must be a string, got {type(extra_input).__name__}")
    if extra_input and extra_input.strip():
        instruction = f"{instruction}\n\n{extra_input}"
    output = _text(row, column(row, src, "output"), "output")
    answer = {"role": "assistant", "content": output, **_reasoning_columns(row, src)}
    messages = [{"role": "user", "content": instruction}, answer]
    return _system(row, src, messages), None, ("instruction", "input", "output", "system", *REASONING_FIELDS)


def _from_prompts(row: Row, src: DataSource):
    prompt = _turns(row, column(row, src, "prompt"), "user", "prompt")
    return _system(row, src, prompt), None, ("prompt", "system")


_CONVERTERS = {
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompts": _from_prompts,
}


# ---------------------------------------------------------------- shared checks


def _optional(row: Row, src: DataSource, name: str) -> Any:
    """An optional column's value (None when absent), through the same mapping as data.column."""
    return row.data.get(src.columns.get(name, name))


def _extra(row: Row, src: DataSource, read: tuple[str, ...]) -> dict:
    used = {src.columns.get(name, name) for name in read}
    return {k: v for k, v in row.data.items() if k not in used}


def _reasoning_columns(row: Row, src: DataSource) -> dict:
    """The optional reasoning_content / thinking columns, for the single assistant message."""
    found = {}
    for name in REASONING_FIELDS:
        value = _optional(row, src, name)
        if value is not None and not isinstance(value, str):
            raise DataError(f"{row.origin}: column {name!r} must be a string, got {type(value).__name__}")
        if value is not None:
            found[name] = value
    return found


def _text(row: Row, value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{row.origin}: {what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{row.origin}: {what} is an empty string")
    return value


def _turns(row: Row, value: Any, role: str, what: str) -> list[dict]:
    """A string (one message of `role`) or a list of messages, as TRL's prompt/completion columns."""
    if isinstance(value, list):
        if not value:
            raise DataError(f"{row.origin}: {what} is an empty list of messages")
        return _messages(row, value, what)
    if isinstance(value, str):
        return [{"role": role, "content": _text(row, value, what)}]
    raise DataError(f"{row.origin}: {what} must be a string or a list of messages, got {type(value).__name__}")


def _messages(row: Row, messages: Any, what: str) -> list[dict]:
    """Checked copies of the messages; keys set to None are dropped (Arrow fills absent keys with None)."""
    if not isinstance(messages, list):
        raise DataError(f"{row.origin}: {what} must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        where = f"{row.origin}: {what}[{i}]"
        if not isinstance(m, dict):
            raise DataError(f"{where}: a message must be a dict with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: {_role_problem(m)} (allowed: {', '.join(ROLES)})")
        tool_calls = m.get("tool_calls")
        if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
            raise DataError(f"{where}: tool_calls must be a list, on an assistant message")
        content = m.get("content")
        # A pure tool-call turn has nothing to say: None content is allowed only there.
        if not isinstance(content, str) and not (content is None and tool_calls):
            raise DataError(f"{where}: {role} content must be a string, got {type(content).__name__}")
        for name in REASONING_FIELDS:
            if m.get(name) is not None and not isinstance(m[name], str):
                raise DataError(f"{where}: {name} must be a string, got {type(m[name]).__name__}")
        out.append({"role": role, "content": content} | {k: v for k, v in m.items() if v is not None})
    return out


def _role_problem(message: dict) -> str:
    role = message.get("role")
    if role is None and "from" in message:
        return "no 'role' key but a 'from' key: ShareGPT-style data, use format: sharegpt"
    if isinstance(role, str) and role.lower() in SHAREGPT_ROLES:
        return (f"unknown role {role!r} (a ShareGPT name for {SHAREGPT_ROLES[role.lower()]!r}: "
                f"use format: sharegpt, or rename it)")
    return f"unknown role {role!r}"


def _system(row: Row, src: DataSource, messages: list[dict]) -> list[dict]:
    """Prepend the optional `system` column; a second system message would be ambiguous."""
    system = _optional(row, src, "system")
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise DataError(f"{row.origin}: column 'system' must be a string, got {type(system).__name__}")
    if messages and messages[0]["role"] == "system":
        raise DataError(f"{row.origin}: both a 'system' column and a system message; keep one")
    return [{"role": "system", "content": system}, *messages]


def _tools(row: Row, src: DataSource) -> list | None:
    tools = _optional(row, src, "tools")
    if isinstance(tools, str):  # many Hub datasets store the tool schemas as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{row.origin}: column 'tools' is a string but not JSON: {e.msg}") from None
    if tools is not None and not isinstance(tools, list):
        raise DataError(f"{row.origin}: column 'tools' must be a list of tool schemas, got {type(tools).__name__}")
    return tools


def _split_prefix(row: Row, chosen: Any, rejected: Any) -> tuple[list[dict], list[dict], list[dict]]:
    """TRL's implicit prompt: the messages chosen and rejected share from the start are the prompt."""
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{row.origin}: without a prompt column, chosen and rejected must be message "
                        f"lists that share the prompt (got {type(chosen).__name__}/{type(rejected).__name__})")
    chosen, rejected = _messages(row, chosen, "chosen"), _messages(row, rejected, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise DataError(f"{row.origin}: chosen and rejected share no opening messages, so there is no "
                        f"prompt (add a prompt column)")
    if n == len(chosen) or n == len(rejected):
        raise DataError(f"{row.origin}: after the shared prompt, chosen or rejected has no response left")
    return chosen[:n], chosen[n:], rejected[n:]
