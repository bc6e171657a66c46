"""`make gpu-check`'s sampling line: n replies per prompt with one prefill per distinct prompt
(finetune.rl.prefill) against transformers' plain generate, which prefills every copy.

On the GPU: the qwen0.5b shape in bf16, 16 prompts of ~1k tokens x 8 replies of 64 tokens, seeded
alike; FAIL when sharing is slower or the first sampled token's log-probs differ by more than bf16
rounding of other batch shapes explains. In --cpu mode the tiny shape, and the time is reported,
not judged (timings on two shared cores mean nothing).
"""

from __future__ import annotations

import random
import time

import torch

CHECK = "sampling (shared prefill)"
FIRST_TOKEN_TOLERANCE = 0.1  # nats; bf16 logits of a ~1k-token prompt computed in other batch shapes


def check(ctx, model_dir) -> list[tuple[str, str, str, str]]:
    """(check, setup, PASS|FAIL, numbers); model_dir(ctx, role) builds the model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.recipe.schema import SamplingCfg

    path = model_dir(ctx, "qwen0.5b")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(ctx.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(0)
    length, count = (20, 4) if ctx.cpu else (400, 16)
    prompts = [[{"role": "user", "content": " ".join(
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))) for _ in range(length))}]
        for _ in range(count)]
    cfg = SamplingCfg(n=8, temperature=1.0, max_new_tokens=8 if ctx.cpu else 64, batch_size=32 if ctx.cpu else 128)
    sample(model, tokenizer, prompts, cfg, shared=True)  # warm-up: kernels, allocator, caches
    plain, plain_s = sample(model, tokenizer, prompts, cfg, shared=False)
    shared, shared_s = sample(model, tokenizer, prompts, cfg, shared=True)
    alike = [(a, b) for a, b in zip(plain, shared, strict=True) if a.completion_ids[:1] == b.completion_ids[:1]]
    first = max((abs(float(a.logprobs[0] - b.logprobs[0])) for a, b in alike), default=float("nan"))
    same = sum(a.completion_ids == b.completion_ids for a, b in zip(plain, shared, strict=True)) / len(plain)
    ok = first <= FIRST_TOKEN_TOLERANCE and (ctx.cpu or shared_s <= plain_s)
    timing = "time not judged on --cpu; " if ctx.cpu else ""
    del model
    return [(CHECK, f"{count} prompts x 8, bf16", "PASS" if ok else "FAIL",
             f"{timing}plain {plain_s:.2f} s, shared {shared_s:.2f} s ({plain_s / shared_s:.2f}x); "
             f"first-token log-prob diff {first:.3g}; identical replies {same:.0%}")]


def sample(model, tokenizer, prompts, cfg, shared: bool):
    """The rollouts and the seconds they took, with the shared prefill on or off."""
    from finetune.rl import rollout

    saved = rollout.shared_prefill
    if not shared:
        rollout.shared_prefill = lambda *a: {}
    try:
        torch.manual_seed(0)
        _sync(model)
        start = time.perf_counter()
        out = rollout.sample_completions(model, tokenizer, prompts, cfg)
        _sync(model)
        return out, time.perf_counter() - start
    finally:
        rollout.shared_prefill = saved


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
