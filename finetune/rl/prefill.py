"""One prefill per distinct prompt: the KV cache of a prompt sampled n times is computed once.

Rejection sampling, GRPO/RLOO and pass@n evaluation decode each prompt n times (8-16 in practice).
transformers' generate repeats the prompt rows before its prefill, so the prompt's forward pass is
paid n times; with prompts longer than the replies it is most of the sampling time (the quickstart's
rs stage: ~70% of its sampling). Here the distinct rows of a left-padded batch go through the model
once, all but their last token, and the cache is gathered back to the batch's rows; generate then
starts from it and feeds only the last prompt token, as it does for a cache passed in. The sampled
tokens and their log-probs are those of the plain call up to float rounding (other batch shapes
are multiplied in other blocks; tests/test_rollout.py: identical seeded samples on five model
kinds, logits within 1e-4, measured 1.5e-7 in fp32).
"""

from __future__ import annotations

import torch


def shared_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """generate() keyword arguments carrying the cache of every row's prompt but its last token,
    computed once per distinct (ids, mask) row; {} when no row repeats or the model's cache cannot
    be handed over (a generation config that names its own cache, recurrent layers, remote code)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a peft adapter
    config = getattr(base, "generation_config", None)
    if input_ids.shape[1] < 2 or getattr(config, "cache_implementation", None) is not None:
        return {}
    if not getattr(config, "use_cache", True) or not type(base).__module__.startswith("transformers."):
        return {}  # remote code may want arguments only generate builds (cache_position): the plain call
    rows = torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1)
    distinct, index = torch.unique(rows, dim=0, return_inverse=True)
    if len(distinct) == len(rows):
        return {}
    width = input_ids.shape[1]
    ids, mask = distinct[:, :width - 1], distinct[:, width:-1]
    # The positions generate derives from a left-padded mask (padding at 0).
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1)
    name = "cache" if getattr(out, "cache", None) is not None else "past_key_values"  # renamed in transformers 5.x
    cache = getattr(out, name, None)
    if cache is None or any(getattr(cache, "is_linear", ())) or not hasattr(cache, "batch_select_indices"):
        return {}
    cache.batch_select_indices(index)
    return {name: cache}
