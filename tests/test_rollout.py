"""Rollouts: sampling-time log-probs match a forward pass, stop/truncation bookkeeping, the recipe
(not the model's generation_config) sets the sampling, seeds reproduce, greedy matches eval."""

from __future__ import annotations

import pytest
import torch

from finetune.data.tokenizer import stop_token_ids
from finetune.recipe.schema import SamplingCfg
from finetune.rl import rollout
from finetune.rl.evaluate import greedy_completions
from finetune.rl.rollout import collate_rollouts, completion_logprobs, sample_completions
from tests.tiny_cache import shared_tiny_model

PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}],
           [{"role": "user", "content": "Compute 12 - 5, and then tell me what 19 + 19 is."}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7 + 7 = ?"}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_tiny_model(tmp_path_factory)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("cfg", [SamplingCfg(n=3, temperature=0.7, max_new_tokens=10, batch_size=4),
                                 SamplingCfg(n=2, temperature=1.3, top_k=20, top_p=0.9, max_new_tokens=10)])
def test_sampling_logprobs_match_a_forward_pass(tiny, cfg):
    model, tok = tiny
    torch.manual_seed(0)
    rollouts = sample_completions(model, tok, PROMPTS, cfg)
    assert [(r.prompt_index, r.sample_index) for r in rollouts] == [(i, j) for i in range(3) for j in range(cfg.n)]
    batch = collate_rollouts(rollouts, tok.pad_token_id)
    with torch.no_grad():
        recomputed = completion_logprobs(model, batch, cfg.temperature)
    mask = batch.completion_mask.bool()
    assert mask.sum() == sum(len(r.completion_ids) for r in rollouts) > 0
    # left-padded KV-cache decoding vs one right-padded forward pass, same weights and temperature
    assert torch.allclose(recomputed[mask], batch.old_logprobs[mask], atol=1e-4)
    assert (batch.old_logprobs[mask] <= 0).all()


def test_completions_are_cut_at_the_first_stop_token(tiny, monkeypatch):
    model, tok = tiny
    stops = list(range(0, len(tok), 2))  # half the vocabulary stops: both outcomes are frequent
    monkeypatch.setattr(rollout, "stop_token_ids", lambda _tok: stops)
    torch.manual_seed(0)
    rollouts = sample_completions(model, tok, PROMPTS, SamplingCfg(n=12, max_new_tokens=3))
    assert {r.stopped for r in rollouts} == {True, False}
    for r in rollouts:
        assert len(r.logprobs) == len(r.completion_ids)
        body = r.completion_ids[:-1] if r.stopped else r.completion_ids
        assert not any(t in stops for t in body)
        if r.stopped:
            assert r.completion_ids[-1] in stops
        else:
            assert r.truncated and len(r.completion_ids) == 3
        assert r.text == tok.decode(body, skip_special_tokens=True)


def test_the_recipe_not_the_models_generation_config_sets_sampling(tiny):
    model, tok = tiny
    # A Hub model's generation_config may carry such settings; they must not leak into our samples.
    saved = model.generation_config.to_dict()
    model.generation_config.top_k = 1
    model.generation_config.suppress_tokens = [t for t in range(len(tok)) if t != 5]
    model.generation_config.repetition_penalty = 50.0
    try:
        torch.manual_seed(0)
        rollouts = sample_completions(model, tok, PROMPTS[:1], SamplingCfg(n=16, max_new_tokens=6))
    finally:
        model.generation_config.top_k = saved["top_k"]
        model.generation_config.suppress_tokens = saved["suppress_tokens"]
        model.generation_config.repetition_penalty = saved["repetition_penalty"]
    assert len({tuple(r.completion_ids) for r in rollouts}) > 8  # the leaked settings give one sample


def test_seeded_sampling_reproduces_and_greedy_matches_the_eval_helper(tiny):
    model, tok = tiny
    cfg = SamplingCfg(n=2, max_new_tokens=8, batch_size=3)
    torch.manual_seed(7)
    a = sample_completions(model, tok, PROMPTS, cfg)
    torch.manual_seed(7)
    b = sample_completions(model, tok, PROMPTS, cfg)
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    greedy = sample_completions(model, tok, PROMPTS, cfg, greedy=True)
    assert len(greedy) == len(PROMPTS)
    assert [r.text for r in greedy] == greedy_completions(model, tok, PROMPTS, max_new_tokens=8)
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    with pytest.raises(ValueError, match="n must be >= 1"):
        sample_completions(model, tok, PROMPTS, cfg, n=0)


SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 64}


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}), ("llama", {"lora": True}),
    ("mistral", {"sliding_window": 3}),  # prompts longer than the window: the cache keeps its tail only
    ("gemma2", {"sliding_window": 4, "head_dim": 8}),  # hybrid: sliding and global layers alternate
    ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4}),  # learned positions: left padding must shift them
])
def test_one_prefill_per_distinct_prompt_samples_what_the_plain_call_samples(model_type, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    from finetune.rl.prefill import shared_prefill

    torch.manual_seed(0)
    extra = dict(extra)
    lora = extra.pop("lora", False)
    keys = {} if model_type == "gpt2" else SMALL
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**keys, "vocab_size": 64, **extra}))
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    rows = [p for p in prompts for _ in range(4)] + [[20, 21]]  # a prompt seen once shares nothing
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    kwargs = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.8, "top_k": 0, "pad_token_id": 0,
              "eos_token_id": None, "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        torch.manual_seed(1)
        plain = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        shared = shared_prefill(model, ids, mask)
        (cache,) = shared.values()  # the prefill was shared: one cache, every row, all but the last token
        assert cache.get_seq_length() == width - 1 and cache.layers[0].keys.shape[0] == len(rows)
        torch.manual_seed(1)
        out = model.generate(input_ids=ids, attention_mask=mask, **shared, **kwargs)
        assert shared_prefill(model, ids[::4], mask[::4]) == {}  # distinct rows: the plain call
    assert torch.equal(out.sequences, plain.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, plain.logits, strict=True)) < 1e-4
