"""Checks before training. Does every trained turn teach the model to stop (shared by `finetune
data` and `finetune run`)? Does the training text agree with the inference-time prompt?

A trained run of tokens that ends on something other than a stop token (``stop_token_ids``) means
the model never learns to end its turn: it would ramble on at inference. `finetune data` shows the
samples and then fails on it; `finetune run` refuses it before loading any weight.
"""

from __future__ import annotations

from finetune.data.reasoning import training_twin

# The renderers' private helpers: this check must render exactly as encode_chat does.
from finetune.data.tokenizer import (
    UnstableTemplateError,
    _divergence,
    _own_template,
    _render,
    _where,
    encode_chat,
    encode_chat_turns,
    stop_token_ids,
    validate_messages,
)
from finetune.errors import DataError, TemplateError


def labels_mask(sample: dict) -> list[int]:
    # The first token of a sample is never a prediction target (the loss shifts by one).
    return [0] + [int(label != -100) for label in sample["labels"][1:]]


def stop_problems(sample: dict, stops: set[int]) -> list[int]:
    """Token indices ending a trained run on something other than a stop token."""
    mask, ids = labels_mask(sample), sample["input_ids"]
    ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    return [i for i in ends if ids[i] not in stops]


def check_learns_to_stop(tokenizer, samples: list[dict], max_length: int, key: str = "data.train") -> None:
    """DataError naming the first sample whose trained turn does not end on a stop token."""
    stops = set(stop_token_ids(tokenizer))
    for i, s in enumerate(samples):
        bad = stop_problems(s, stops)
        # A truncated sample may legitimately end mid-answer.
        if bad and not (bad == [len(s["input_ids"]) - 1] and len(s["input_ids"]) >= max_length):
            tok = tokenizer.decode([s["input_ids"][bad[0]]])
            raise DataError(f"{key}: sample {i}: a trained turn ends on {tok!r}, not a stop token; the model "
                            "would not learn to stop (check the chat template's end-of-turn token)")


def check_generation_prompt(
    tokenizer, messages: list[dict], tools: list | None = None, index: int | None = None
) -> None:
    """Raise TemplateError when training text and the inference-time prompt disagree.

    For every assistant turn, the history rendering must start with ``messages[:i]`` rendered with
    ``add_generation_prompt=True``; a prompt-only conversation is checked with a probe reply.
    """
    validate_messages(messages, "all", index)
    if messages[-1].get("role") != "assistant":
        messages = [*messages, {"role": "assistant", "content": "ok"}]
    full = _render(tokenizer, messages, tools, index=index)
    for i, message in enumerate(messages):
        if i == 0 or message.get("role") != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], tools, prompt=True, index=index)
        if not full.startswith(prompt):
            if training_twin(_own_template(tokenizer)) is not None or _per_turn(tokenizer, messages, tools):
                return  # trained through trl's twin, or one sample per turn whose prompt is the real one
            raise TemplateError(
                f"{_where(index)}the generation prompt before message {i} differs from the training "
                f"rendering: {_divergence(prompt, full)}"
            )


def _per_turn(tokenizer, messages, tools) -> bool:
    """True when training renders each turn on its own (encode_chat_turns)."""
    try:
        encode_chat(tokenizer, messages, tools=tools)
    except UnstableTemplateError:
        try:  # and that works: otherwise training fails with the template's own one-line error
            encode_chat_turns(tokenizer, messages, tools=tools)
        except TemplateError:
            return False
        return True
    return False
