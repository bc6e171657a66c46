"""Does every trained turn teach the model to stop? Shared by `finetune data` and `finetune run`.

A trained run of tokens that ends on something other than a stop token (``stop_token_ids``) means
the model never learns to end its turn: it would ramble on at inference. `finetune data` shows the
samples and then fails on it; `finetune run` refuses it before loading any weight.
"""

from __future__ import annotations

from finetune.data.tokenizer import stop_token_ids
from finetune.errors import DataError


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
