"""Tokenizers and chat templates: the only module that knows how conversations become tokens.

Template choice: ``resolve_chat_template`` turns the recipe's ``tokenizer.chat_template`` (auto | a
built-in name | a ``.jinja`` path | inline Jinja) into template text; built-ins live in
``finetune/templates/NAME.jinja``.

Masks (``encode_chat``) work for any template, with or without ``{% generation %}`` markers. The
conversation is rendered once in full and tokenized with offset mappings. For each assistant turn
``i`` we render the prefix ``messages[:i]`` with ``add_generation_prompt=True`` (what the model
sees at inference time) and ``messages[:i+1]`` (the turn closed); the trained character span runs
from the end of the first to the end of the second. Both renderings must be string prefixes of the
full rendering; when one is not, the template is not prefix-stable (it drops reasoning from earlier
turns, or its generation prompt differs from how it renders history) and no span is trustworthy,
so we fall back to the template's ``{% generation %}`` blocks or raise ``UnstableTemplateError``
(``sources.encode_chat_turns`` then makes one sample per turn). A template trl ships a training
twin for (Qwen3, DeepSeek-R1, GPT-OSS, GLM-4 MoE...: ``finetune.data.reasoning``) is rendered by
the twin and masked by its blocks, as trl does. Character spans become token labels through the
offsets.

Conventions (tests pin each one):
- Labels are aligned with ``input_ids`` (no shift; the loss shifts); -100 marks untrained tokens.
- Trained: the assistant's content, tool calls and the end-of-turn text that closes the turn
  (``<|im_end|>``, ``<|eot_id|>``, ``</s>``, ``<end_of_turn>``, ``<|end|>``...), so the model learns
  to stop; Phi-3's conversation-final EOS too. Not trained: the generation-prompt header and every
  non-assistant message, tool results included. An assistant message that opens the conversation
  has no prompt to split at: it is context.
- Whitespace between header and content is trained only when the inference-time generation prompt
  does not already contain it (ChatML's and Llama-3's header newlines are part of the prompt).
  Whitespace after a closing special token is never trained: generation stops at that token.
- A token that straddles a span boundary is trained if any of its characters is inside the span.
- In marker fallback the template's blocks decide, minus leading whitespace and whitespace after a
  closing special token, as above (so both paths agree on trl's twins).
- train_on: "assistant" every assistant message, "last_assistant" the last one, "completion" every
  assistant message after the last user/system one (the completion of prompt/completion data,
  tool calls included), "all" every token.
- Masks come from spans and lengths, never from ``ids == pad_id``; see ``ensure_pad_token``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from finetune.data.reasoning import REASONING_FIELDS, place_reasoning, reasoning_field, split_reasoning, training_twin
from finetune.errors import DataError, TemplateError

IGNORE_INDEX = -100
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
ROLES = ("system", "user", "assistant", "tool")
TRAIN_ON = ("assistant", "last_assistant", "completion", "all")
OVERFLOW = ("truncate", "drop")
TEMPLATES_DIR = Path(__file__).parent / "templates"
# Special tokens a built-in template writes; added to a tokenizer that lacks them.
BUILTIN_TEMPLATE_TOKENS = {"chatml": ("<|im_start|>", "<|im_end|>")}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


# ---------------------------------------------------------------- tokenizer from scratch


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    chat_template: str | None = None,
    *,
    bos_token: str = "<|endoftext|>",
    eos_token: str = "<|endoftext|>",
    pad_token: str = "<|pad|>",
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it as a transformers fast tokenizer.

    Byte-level means no unknown tokens and exact decoding. ``chat_template`` is any spec that
    ``resolve_chat_template`` accepts except "auto" (e.g. "chatml").
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([bos_token, eos_token, pad_token, *special_tokens]))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size {vocab_size} is below the {len(alphabet)} bytes + {len(specials)} specials")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False: offsets must cover whitespace exactly, masks are built from them.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    named = {bos_token, eos_token, pad_token}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=[t for t in specials if t not in named],
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        tokenizer.chat_template = resolve_chat_template(tokenizer, chat_template)
    return tokenizer


# ---------------------------------------------------------------- template choice


def builtin_templates() -> list[str]:
    """Names accepted as built-in templates (files in finetune/templates/)."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))


def resolve_chat_template(tokenizer, spec: str, base_dir: Path | None = None) -> str:
    """Template text for ``spec``: "auto", a built-in name, a ``.jinja`` path or inline Jinja."""
    if spec == "auto":
        template = _own_template(tokenizer)
    elif "{%" in spec or "{{" in spec:
        template = spec
    elif spec.endswith(".jinja"):
        path = Path(spec) if base_dir is None else Path(base_dir) / spec
        if not path.is_file():
            raise TemplateError(f"chat template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    elif spec in builtin_templates():
        template = (TEMPLATES_DIR / f"{spec}.jinja").read_text(encoding="utf-8")
    else:
        close = difflib.get_close_matches(spec, builtin_templates(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TemplateError(
            f"unknown chat template {spec!r}{hint}: use auto, a built-in name "
            f"({', '.join(builtin_templates())}), a path ending in .jinja, or inline Jinja"
        )
    _check_compiles(template, spec)
    return template


def _own_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the unnamed one is "default"
        template = template.get("default")
    if not template:
        raise TemplateError(
            "the tokenizer has no chat template; set tokenizer.chat_template: chatml "
            "(or a .jinja path, or inline Jinja)"
        )
    return template


def _check_compiles(template: str, spec: str) -> None:
    """Fail at template choice, not at the first sample, on a Jinja syntax error."""
    from jinja2 import TemplateSyntaxError

    try:  # transformers' compiler knows the {% generation %} tag that plain jinja2 rejects
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # private helper moved: skip the early check, rendering still reports
        return

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as exc:
        name = spec if len(spec) < 60 and "\n" not in spec else "inline template"
        raise TemplateError(f"chat template {name}: Jinja syntax error line {exc.lineno}: {exc.message}") from None


def apply_chat_template_choice(tokenizer, spec: str, base_dir: Path | None = None) -> list[str]:
    """Set the chosen template on ``tokenizer``; return the special tokens added (resize embeddings)."""
    from tokenizers import AddedToken

    tokenizer.chat_template = resolve_chat_template(tokenizer, spec, base_dir)
    needed = BUILTIN_TEMPLATE_TOKENS.get(spec, ())
    # A token in the vocab but not registered as added would be split into pieces: register it
    # too, but only report the ones that got new ids.
    unregistered = [t for t in needed if t not in tokenizer.get_added_vocab()]
    new = [t for t in unregistered if t not in tokenizer.get_vocab()]
    if unregistered:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in unregistered], special_tokens=True)
    return new


# ---------------------------------------------------------------- pad policy


# Tokens a family ships for padding or leaves unused, best first: taking one keeps the vocabulary
# (the adapter then loads on the untouched base with plain peft, merged models keep their shape).
PAD_NAMES = ("<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>",
             "<fim_pad>", "<|fim_pad|>", "<|endoftext|>")
RESERVED_PAD = re.compile(r"<\|reserved_special_token_\d+\|>|<\|reserved_\d+\|>|\[control_\d+\]|<unused\d+>|"
                          r"<\|placeholder\d+\|>|<SPECIAL_\d+>|<extra_id_\d+>")


def pad_candidate(tokenizer, avoid: set[int] = frozenset()) -> str | None:
    """An existing token that can pad: a family's pad-named token, else its last reserved/unused one,
    never bos/eos, a token of ``avoid`` or one the chat template writes."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    taken = {tokenizer.eos_token, tokenizer.bos_token} | {t for t, i in vocab.items() if i in avoid}

    def free(token: str) -> bool:
        return token in vocab and token not in taken and token not in template

    for name in PAD_NAMES:
        if free(name):
            return name
    reserved = [t for t in vocab if RESERVED_PAD.fullmatch(t) and free(t)]
    if reserved:
        return max(reserved, key=vocab.__getitem__)  # the last: templates and tools use the first ones
    unk = tokenizer.unk_token
    return unk if unk is not None and free(unk) else None


def ensure_pad_token(tokenizer, distinct_from: set[int] | None = None) -> str:
    """Make sure a pad token exists without growing the vocabulary; return what was done, in a few words.

    A missing pad takes an existing pad-named or reserved token (``pad_candidate``), else EOS: our
    masks come from lengths and template spans, never from ``ids == pad_id``, so pad == eos costs
    nothing here. Only when the caller needs a pad outside ``distinct_from`` (PPO: padding after a
    stop must not read as stops) and no free token exists is "<|pad|>" added (the vocab grows).
    """
    avoid = set(distinct_from or ())
    pad = tokenizer.pad_token
    if pad is not None and tokenizer.pad_token_id not in avoid:
        note = " (same as eos; harmless: masks come from lengths)" if pad == tokenizer.eos_token else ""
        return f"pad token {pad!r} already set{note}"
    candidate = pad_candidate(tokenizer, avoid)
    if candidate is not None:
        tokenizer.pad_token = candidate
        return f"pad token set to the existing {candidate!r} (id {tokenizer.pad_token_id}; vocabulary unchanged)"
    if not avoid and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return f"pad token set to eos {tokenizer.eos_token!r} (vocabulary unchanged; masks come from lengths)"
    existed = "<|pad|>" in tokenizer.get_vocab()
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if existed:
        return f"pad token set to existing '<|pad|>' (id {tokenizer.pad_token_id})"
    return f"added pad token '<|pad|>' (id {tokenizer.pad_token_id}); resize the embeddings"


# ---------------------------------------------------------------- encoding


def encode_text(tokenizer, text: str, add_eos: bool = True) -> list[int]:
    """Token ids of a pretraining document; EOS appended so documents stay separated when packed."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise TemplateError("the tokenizer has no eos_token; documents cannot be separated")
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids.append(tokenizer.eos_token_id)
    return ids


def validate_messages(messages: Any, train_on: str = "assistant", index: int | None = None) -> None:
    """Raise DataError, naming the sample, for a conversation that cannot be encoded."""
    where = _where(index)
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}empty conversation (expected a non-empty list of messages)")
    for pos, message in enumerate(messages):
        _validate_message(message, f"{where}message {pos}: ")
    if train_on == "all":
        return
    if not selected_turns(messages, train_on):
        need = "after the last user message" if train_on == "completion" else "after a prompt"
        raise DataError(f"{where}no assistant message {need} to train on (train_on: {train_on})")


def _validate_message(message: Any, where: str) -> None:
    if not isinstance(message, dict):
        raise DataError(f"{where}expected a dict with role and content, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise DataError(f"{where}unknown role {role!r} (allowed: {', '.join(ROLES)})")
    content = message.get("content")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and (role != "assistant" or not isinstance(tool_calls, list)):
        raise DataError(f"{where}tool_calls must be a list on an assistant message")
    for name in REASONING_FIELDS:
        if message.get(name) is not None and not isinstance(message[name], str):
            raise DataError(f"{where}{name} must be a string, got {type(message[name]).__name__}")
    if role == "assistant" and tool_calls:
        return  # a pure tool-call turn may have empty or no content
    if content is None:
        raise DataError(f"{where}{role} message has no content")
    if not isinstance(content, (str, list)):
        raise DataError(f"{where}content must be a string or a list of parts, got {type(content).__name__}")
    if role in ("user", "assistant") and not (content.strip() if isinstance(content, str) else content):
        raise DataError(f"{where}{role} message has empty content")


def _where(index: int | None) -> str:
    return "" if index is None else f"sample {index}: "


def selected_turns(messages: list[dict], train_on: str) -> list[int]:
    """Indexes of the assistant messages ``train_on`` trains.

    A message at index 0 has no prompt before it to split at (and transformers cannot render an
    empty conversation), so it is context, never trained. "completion" trains every assistant
    message after the last user/system one: for prompt/completion data that is the completion.
    """
    turns = [i for i, m in enumerate(messages) if i > 0 and m.get("role") == "assistant"]
    if train_on == "last_assistant":
        return turns[-1:]
    if train_on == "completion":
        last_prompt = max((i for i, m in enumerate(messages) if m.get("role") in ("user", "system")), default=-1)
        return [i for i in turns if i > last_prompt]
    return turns


def encode_chat(
    tokenizer,
    messages: list[dict],
    train_on: str = "assistant",
    max_length: int | None = None,
    overflow: str = "truncate",
    tools: list | None = None,
    index: int | None = None,
) -> dict | None:
    """Encode a conversation: {"input_ids", "labels", "truncated"}, or None when dropped.

    ``labels`` equals ``input_ids`` on trained tokens, -100 elsewhere. Overlong samples are cut to
    ``max_length`` keeping the start (``truncated`` is then True; the cut may leave no trained token
    — the caller counts labels) or, with ``overflow="drop"``, dropped (None).
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    validate_messages(messages, train_on, index)
    template, messages, by_markers = _training_rendering(tokenizer, messages, train_on, tools, index)
    full = _render(tokenizer, messages, tools, index=index, template=template)
    ids, offsets = _tokenize_with_offsets(tokenizer, full)
    if train_on == "all":
        labels = list(ids)
    else:
        spans = _trained_spans(tokenizer, messages, train_on, tools, full, ids, offsets, index, template, by_markers)
        labels = _labels_from_spans(ids, offsets, spans)
    truncated = max_length is not None and len(ids) > max_length
    if truncated and overflow == "drop":
        return None
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def encode_chat_turns(tokenizer, messages: list[dict], train_on: str = "assistant", max_length: int | None = None,
                      overflow: str = "truncate", tools: list | None = None) -> list[dict | None]:
    """[encode_chat's sample]; or, when no single rendering can be masked (history rewritten, no
    {% generation %} blocks, no trl twin), one sample per trained turn: the conversation up to it,
    rendered as at inference (tokens grow quadratically with turns, masks are exact)."""
    kw = {"max_length": max_length, "overflow": overflow, "tools": tools}
    try:
        return [encode_chat(tokenizer, messages, train_on, **kw)]
    except UnstableTemplateError:
        if train_on not in ("assistant", "completion"):
            raise
        return [encode_chat(tokenizer, messages[: i + 1], "last_assistant", **kw)
                for i in selected_turns(messages, train_on)]


def _render(tokenizer, messages: list[dict], tools, prompt: bool = False, index: int | None = None,
            template: str | None = None) -> str:
    """Render as text; the template's own errors (e.g. roles must alternate) become TemplateError."""
    try:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt,
                                             chat_template=template)
    except Exception as exc:  # jinja2 raise_exception, UndefinedError, TypeError on odd data...
        raise TemplateError(f"{_where(index)}chat template failed to render: {exc}".splitlines()[0]) from None


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("encode_chat needs a fast tokenizer (offset mappings); this one is slow")
    # add_special_tokens=False: the template writes BOS itself, exactly as apply_chat_template does.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


class UnstableTemplateError(TemplateError):
    """No single rendering can be masked: not prefix-stable, no {% generation %} blocks, no twin."""


@dataclass(frozen=True)
class _Span:
    """Characters [start, end) of the full rendering trained for one assistant message."""

    message: int | None  # index into messages; None when markers could not be attributed
    start: int
    end: int


def _training_rendering(tokenizer, messages, train_on, tools, index) -> tuple[str, list[dict], bool]:
    """(template, messages, masks from its {% generation %} blocks?) to render training text with.

    The tokenizer's own template, unless it is a trl original with a training twin: then the twin
    renders and its blocks decide, as in trl. With train_on: last_assistant the own template is
    kept when it renders that turn as at inference, ending on a special token, its reasoning kept
    (Qwen3, GPT-OSS); else the twin renders, the history stripped of reasoning as at inference.
    Reasoning goes where the template reads it (reasoning_content, thinking or inline <think>).
    """
    own = _own_template(tokenizer)
    twin = training_twin(own)
    placed = place_reasoning(messages, reasoning_field(tokenizer, own))
    if twin is None or (train_on == "last_assistant" and _own_template_fits(tokenizer, placed, train_on, tools, index)):
        return own, placed, False
    last = selected_turns(messages, "last_assistant")
    drop = last[0] if train_on == "last_assistant" and last else 0
    return twin[1], place_reasoning(messages, reasoning_field(tokenizer, twin[1]), drop_before=drop), True


def _own_template_fits(tokenizer, messages, train_on, tools, index) -> bool:
    wanted = selected_turns(messages, train_on)
    full = _render(tokenizer, messages, tools, index=index)
    spans, problem = _prefix_spans(tokenizer, messages, wanted, tools, full, index)
    if problem is not None:
        return False
    closers = [t for t in _special_strings(tokenizer) if t]
    for span in spans:
        text = full[span.start : span.end].rstrip()
        reasoning = split_reasoning(messages[span.message])[0]
        if not any(text.endswith(t) for t in closers) or (reasoning and reasoning.strip() not in text):
            return False
    return True


def _trained_spans(tokenizer, messages, train_on, tools, full, ids, offsets, index, template,
                   by_markers) -> list[_Span]:
    wanted = selected_turns(messages, train_on)
    if by_markers:
        spans, problem = [], "a trl training twin renders it"
    else:
        spans, problem = _prefix_spans(tokenizer, messages, wanted, tools, full, index, template)
    if problem is None:
        return spans
    if not _GENERATION_TAG.search(template):
        hint = "" if train_on == "last_assistant" else " or train_on: last_assistant"
        raise UnstableTemplateError(
            f"{_where(index)}chat template is not prefix-stable: {problem}; masks would be wrong. "
            f"Use a template with {{% generation %}} markers, tokenizer.chat_template: chatml{hint}"
        )
    marked = _marker_spans(tokenizer, messages, tools, full, ids, offsets, index, template)
    if train_on == "assistant":
        return marked
    if any(s.message is None for s in marked):
        raise TemplateError(
            f"{_where(index)}chat template is not prefix-stable ({problem}) and its generation blocks "
            f"cannot be matched to messages, so train_on: {train_on} is impossible; use train_on: assistant"
        )
    return [s for s in marked if s.message in wanted]


def _prefix_spans(tokenizer, messages, wanted, tools, full, index, template=None) -> tuple[list[_Span], str | None]:
    """Spans from prefix renderings, or ([], reason) when the template is not prefix-stable."""
    eos = tokenizer.eos_token or ""
    closers = _special_strings(tokenizer)
    spans = []
    for i in wanted:
        prompt = _render(tokenizer, messages[:i], tools, prompt=True, index=index, template=template)
        if not full.startswith(prompt):
            why = f"the generation prompt before message {i} differs from the history"
            return [], f"{why} ({_divergence(prompt, full)})"
        last = i == len(messages) - 1
        closed = full if last else _render(tokenizer, messages[: i + 1], tools, index=index, template=template)
        end = _closed_end(closed, full, eos)
        if end is None or end <= len(prompt):
            return [], f"message {i} renders differently once later messages follow ({_divergence(closed, full)})"
        spans.append(_Span(i, len(prompt), _trim_closing(full, len(prompt), end, closers)))
    return spans, None


def _closed_end(closed: str, full: str, eos: str) -> int | None:
    """Where the turn ends in ``full``, given its rendering as the last message."""
    if full.startswith(closed):
        return len(closed)
    # Phi-3 style templates append EOS after the last message only: a turn that is last in the
    # prefix but not in the conversation carries that extra EOS.
    if eos and closed.endswith(eos) and full.startswith(closed[: -len(eos)]):
        return len(closed) - len(eos)
    return None


def _trim_closing(text: str, start: int, end: int, closers: Sequence[str]) -> int:
    """Drop whitespace after a closing special token: generation stops at the token, never emits it."""
    stripped = len(text[start:end].rstrip()) + start
    if stripped > start and any(text.startswith(t, stripped - len(t)) for t in closers if t):
        return stripped
    return end


def _special_strings(tokenizer) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return [t.content for t in added.values() if getattr(t, "special", False)] or list(tokenizer.all_special_tokens)


def _divergence(a: str, b: str, width: int = 24) -> str:
    """One-line excerpt where two renderings part ways, for error messages."""
    k = next((n for n, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    lo = max(0, k - width)
    return f"{a[lo : k + width]!r} vs {b[lo : k + width]!r}"


def _marker_spans(tokenizer, messages, tools, full, ids, offsets, index, template) -> list[_Span]:
    """Spans from the template's ``{% generation %}`` blocks (fallback for unstable templates).

    Blocks separated only by whitespace are one turn (Phi-3 marks the final EOS separately). When
    the turns number exactly the assistant messages they are attributed in order.
    """
    enc = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        chat_template=template,
    )
    mask = list(enc["assistant_masks"])
    if list(enc["input_ids"]) != ids:
        raise TemplateError(f"{_where(index)}chat template renders differently with return_assistant_tokens_mask")
    runs = _runs(mask)
    chars = [(offsets[a][0], offsets[b - 1][1]) for a, b in runs]
    merged: list[list[int]] = []
    for start, end in chars:
        if merged and not full[merged[-1][1] : start].strip():
            merged[-1][1] = end
        else:
            merged.append([start, end])
    if not merged:
        raise TemplateError(f"{_where(index)}chat template's {{% generation %}} blocks mark no assistant text")
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    owners = assistants if len(assistants) == len(merged) else [None] * len(merged)
    closers = _special_strings(tokenizer)
    spans = []
    for owner, (start, end) in zip(owners, merged, strict=True):
        start += len(full[start:end]) - len(full[start:end].lstrip())  # the header's newline
        spans.append(_Span(owner, start, _trim_closing(full, start, end, closers)))
    return [s for s in spans if s.message != 0]


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive truthy entries."""
    runs, start = [], None
    for k, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = k
        elif not flag and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[_Span]) -> list[int]:
    """A token is trained when it overlaps a span (an empty token: when it sits inside one)."""
    import numpy as np

    flat = np.fromiter(chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets))
    s, e = flat[0::2], flat[1::2]
    inside = np.zeros(len(ids), dtype=bool)
    for span in spans:
        inside |= np.where(s == e, (span.start <= s) & (s < span.end), (s < span.end) & (e > span.start))
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist()


# ---------------------------------------------------------------- stop tokens


_TOOL_PROBE_CALL = [{"type": "function", "function": {"name": "probe", "arguments": {"x": "1"}}}]
_TOOL_PROBE = [{"type": "function", "function": {"name": "probe", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus every special token that ends a trained assistant turn: stop generation on them.

    Probed at each turn position (a turn in the history, the final turn, a tool-call turn), since
    templates differ there: harmony ends history turns with <|end|>, the final one with <|return|>
    and tool calls with <|call|>; GLM ends a turn with the next role's token (<|user|>,
    <|observation|>). A template that cannot render tool calls simply adds nothing for them.
    """
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    tool_chat = [chat[0], {"role": "assistant", "content": "", "tool_calls": _TOOL_PROBE_CALL},
                 {"role": "tool", "content": "e"}, chat[3]]
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    special = set(tokenizer.all_special_ids) | {k for k, t in tokenizer.added_tokens_decoder.items() if t.special}
    for probe, tools in ((chat, None), (tool_chat, _TOOL_PROBE)):
        try:
            samples = encode_chat_turns(tokenizer, probe, "assistant", tools=tools)
        except (TemplateError, DataError):
            if tools is None:
                raise
            continue
        for labels in (s["labels"] for s in samples if s is not None):
            for _, end in _runs([label != IGNORE_INDEX for label in labels]):
                if labels[end - 1] in special and labels[end - 1] not in ids:
                    ids.append(labels[end - 1])
    return ids
