"""Reasoning-model chat templates: trl's training twins, and where a message carries its reasoning.

Qwen3, DeepSeek-R1 distills, DeepSeek-V3, GPT-OSS, GLM-4 MoE, Nemotron 3... render a conversation for
inference, not for training: they delete earlier turns' reasoning, add an empty ``<think></think>``
to the last turn only, or end a turn with no end-of-turn token at all (GLM: the next ``<|user|>``
ends it). trl ships a "training twin" for each (``trl/chat_templates/NAME_training.jinja``): the
same rendering with ``{% generation %}`` blocks around what the model's authors train, the
end-of-turn token included. When a tokenizer's template is byte-identical to a trl original that
has a twin, training text is rendered with the twin and masked by its blocks (``encode_chat``);
the tokenizer itself keeps its own template, so saved runs and generation use the original.

Reasoning may arrive as ``reasoning_content`` (Qwen3, GLM), ``thinking`` (GPT-OSS) or inline
``<think>...</think>`` at the start of the content (DeepSeek-R1). ``place_reasoning`` moves it to
where the template reads it, so no format silently loses the reasoning.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

REASONING_FIELDS = ("reasoning_content", "thinking")
_INLINE = re.compile(r"\A\s*<think>(.*?)</think>\s*", re.S)
_SENTINEL = "zq7reasoningprobe"
_field_cache: dict[str, str | None] = {}


@cache
def _trl_twins() -> dict[str, tuple[str, str]]:
    """trl's originals (stripped text) -> (name, training twin text). Read from files: no trl import."""
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "chat_templates"
    twins = {}
    for twin in sorted(folder.glob("*_training.jinja")):
        original = folder / twin.name.replace("_training.jinja", ".jinja")
        if original.is_file():
            twins[original.read_text(encoding="utf-8").strip()] = (original.stem, twin.read_text(encoding="utf-8"))
    return twins


def training_twin(template: str | None) -> tuple[str, str] | None:
    """(family name, twin text) when ``template`` is a trl original with a training twin."""
    if not isinstance(template, str):
        return None
    return _trl_twins().get(template.strip())


def reasoning_field(tokenizer, template: str) -> str | None:
    """The message field ``template`` renders reasoning from, or None (inline ``<think>`` only)."""
    if template not in _field_cache:
        found = None
        for name in REASONING_FIELDS:
            probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", name: _SENTINEL}]
            try:
                text = tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
            except Exception:  # a template that cannot render the probe reads no such field
                continue
            if _SENTINEL in text:
                found = name
                break
        _field_cache[template] = found
    return _field_cache[template]


def split_reasoning(message: dict) -> tuple[str | None, dict]:
    """(reasoning or None, the message without it) from a field or inline ``<think>`` content."""
    rest = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    for name in REASONING_FIELDS:
        if isinstance(message.get(name), str):
            return message[name], rest
    content = message.get("content")
    match = _INLINE.match(content) if isinstance(content, str) else None
    if match is None:
        return None, rest
    return match.group(1).strip("\n"), rest | {"content": content[match.end():]}


def place_reasoning(messages: list[dict], field: str | None, drop_before: int = 0) -> list[dict]:
    """Assistant reasoning moved to ``field`` (None: inline ``<think>``); dropped from messages
    before index ``drop_before`` (the history a template shows at inference has none)."""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            out.append(m)
            continue
        reasoning, rest = split_reasoning(m)
        if reasoning is None or i < drop_before:
            out.append(rest if reasoning is not None else m)
        elif field is not None:
            out.append(m if isinstance(m.get(field), str) else rest | {field: reasoning})
        elif any(isinstance(m.get(f), str) for f in REASONING_FIELDS):
            # An empty field means "no reasoning": inline, it would train an empty <think></think>.
            text = rest.get("content") or ""
            out.append(rest | {"content": f"<think>\n{reasoning}\n</think>\n\n{text}"} if reasoning.strip() else rest)
        else:
            out.append(m)  # already inline, exactly as the user wrote it
    return out
