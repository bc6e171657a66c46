"""Held-out generation metrics: greedy completions of chat prompts and exact-match accuracy.

Greedy decoding keeps the number comparable between runs and stages. Generation stops at EOS
and at the template's end-of-turn token (e.g. <|im_end|>), with left-padded batches.
"""

from __future__ import annotations

import torch

from finetune.data.tokenizer import stop_token_ids


def normalize_answer(text: str) -> str:
    """Whitespace-collapsed, lower-cased, without a trailing full stop: "  12. " == "12"."""
    return " ".join(text.split()).lower().rstrip(".").strip()


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 32,
                       batch_size: int = 32) -> list[str]:
    """Greedy assistant replies to each prompt conversation (chat template, generation prompt)."""
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in chunk]
        ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
        gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
    if was_training:
        model.train()
    return out


def final_answer(text: str) -> str:
    """The answer after a reasoning block: R1-style prompts open <think> themselves, so split at the
    last </think> (a reply or reference without one is all answer)."""
    return text.rsplit("</think>", 1)[-1]


def exact_match(model, tokenizer, prompts: list[list[dict]], references: list[str],
                max_new_tokens: int = 32) -> tuple[float, list[str]]:
    """Fraction of greedy completions whose final answer equals the reference's, after normalisation."""
    completions = greedy_completions(model, tokenizer, prompts, max_new_tokens)
    hits = [normalize_answer(final_answer(c)) == normalize_answer(final_answer(r))
            for c, r in zip(completions, references, strict=True)]
    return (sum(hits) / len(hits) if hits else 0.0), completions
