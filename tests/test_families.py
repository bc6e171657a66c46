"""Conformance matrix: every family in tests/families.py through every stage, on default settings.

Each family is a tiny random-init model saved with its family-like tokenizer (tests/families.py).
Stages: LoRA SFT (padding-free batches, the default), verified merge, generate from the adapter
and the merged model, packed full SFT (data.packing), a reward model for 2 steps, one PPO update
with LoRA. Only sizes and step counts are set; everything else is the recipe defaults.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.infer.inference import Settings, generate, load_for_inference
from finetune.models.merge import merge_adapter
from finetune.models.reward_model import last_token_rewards, load_trained_reward_model
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.families import BY_NAME, FAMILIES, ROOT, save_family

QUICK = ROOT / "data/quickstart"
RUN = {"max_steps": 2, "micro_batch_size": 4, "log_every": 1, "seed": 1}
PROMPTS = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Compute 12 - 5."}]]


def source(name: str, fmt: str, n: int) -> list[dict]:
    return [{"path": str(QUICK / name), "format": fmt, "max_samples": n}]


def sft(model_dir, out, **extra) -> dict:
    return {"model": {"name": str(model_dir)}, "data": {"train": source("sft_train.jsonl", "messages", 16)},
            "trainer": {"type": "sft"}, "run": {**RUN, "output_dir": str(out)}, **extra}


def losses(out) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_family_through_every_stage(name, tmp_path, capsys):
    family = BY_NAME[name]
    base = save_family(family, tmp_path / "base")
    vocab = len(AutoTokenizer.from_pretrained(base))

    # LoRA SFT on defaults (padding-free), then the adapter loads with plain peft on the untouched
    # base: no row was added to the vocabulary (pad-token policy).
    adapter = run_recipe(recipe_from_dict(sft(base, tmp_path / "lora", adapter={"r": 4, "alpha": 8})))
    assert all(math.isfinite(x) for x in losses(tmp_path / "lora"))
    assert len(AutoTokenizer.from_pretrained(adapter)) == vocab, "the run grew the vocabulary"
    plan = capsys.readouterr().err
    assert ("eager attention one sample at a time" in plan) == (name in ("gemma2", "gpt_oss"))

    # verified merge, and generation from the adapter and from the merged model agree
    report = merge_adapter(adapter, tmp_path / "merged")
    assert report.max_abs_logit_diff <= report.tolerance
    settings = Settings(max_new_tokens=4)
    texts = [[c.text for c in generate(load_for_inference(str(ref)), PROMPTS, settings)]
             for ref in (adapter, tmp_path / "merged")]
    assert texts[0] == texts[1]

    # packed full SFT (rows bin-packed to tokenizer.max_length)
    full = sft(base, tmp_path / "full", tokenizer={"max_length": 128},
               data={"train": source("sft_train.jsonl", "messages", 16), "packing": True})
    run_recipe(recipe_from_dict(full | {"run": full["run"] | {"micro_batch_size": 2}}))
    assert all(math.isfinite(x) for x in losses(tmp_path / "full"))

    # a reward model, 2 steps (Granite and Cohere have no scalar-head class in transformers: ours),
    # then loaded back for scoring
    rm = run_recipe(recipe_from_dict({
        "model": {"name": str(base)}, "data": {"train": source("preference_train.jsonl", "preference", 8)},
        "trainer": {"type": "reward"}, "run": {**RUN, "output_dir": str(tmp_path / "rm")}}))
    assert all(math.isfinite(x) for x in losses(tmp_path / "rm"))
    scorer = load_trained_reward_model(rm)
    ids = torch.arange(5, 12)[None]
    assert torch.isfinite(last_token_rewards(scorer, ids, torch.ones_like(ids))).all()

    # one PPO update with LoRA
    run_recipe(recipe_from_dict({
        "model": {"name": str(base)}, "adapter": {"r": 4, "alpha": 8},
        "data": {"train": source("prompts_train.jsonl", "prompts", 4)},
        "trainer": {"type": "ppo", "sampling": {"n": 1, "max_new_tokens": 4},
                    "rewards": [{"type": "numeric"}], "ppo": {"rollout_batch_size": 4, "minibatches": 1}},
        "run": {**RUN, "max_steps": 1, "micro_batch_size": 2, "output_dir": str(tmp_path / "ppo")}}))
    updates = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert any("policy_loss" in r and math.isfinite(r["policy_loss"]) for r in updates)


def test_llama3_adapter_loads_on_the_untouched_base_with_plain_peft(tmp_path):
    """Llama-3 ships no pad token: the run pads with <|finetune_right_pad_id|>, adds no token, and
    PeftModel.from_pretrained on the untouched base gives our loader's logits."""
    from peft import PeftModel

    base = save_family(BY_NAME["llama3"], tmp_path / "base")
    adapter = run_recipe(recipe_from_dict(sft(base, tmp_path / "lora", adapter={"r": 4, "alpha": 8},
                                              optim={"lr": 1e-2})))
    tok = AutoTokenizer.from_pretrained(adapter)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert len(tok) == len(AutoTokenizer.from_pretrained(base))
    ids = torch.tensor([tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True)["input_ids"]])
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ours = load_for_inference(str(adapter)).model.eval()
    reference = logits(AutoModelForCausalLM.from_pretrained(base).eval(), ids)
    assert (logits(plain, ids) - reference).abs().max() > 1e-4  # the adapter changed something
    torch.testing.assert_close(logits(plain, ids), logits(ours, ids))


def test_added_tokens_adapter_loads_with_plain_peft_as_the_plan_says(tmp_path, capsys):
    """tokenizer.chat_template: chatml on Llama-3 adds <|im_start|>/<|im_end|>: the vocabulary must
    grow; the plan then says how plain peft loads the adapter, and doing so gives our logits."""
    from peft import PeftModel

    base = save_family(BY_NAME["llama3"], tmp_path / "base")
    adapter = run_recipe(recipe_from_dict(sft(base, tmp_path / "lora", adapter={"r": 4, "alpha": 8},
                                              tokenizer={"chat_template": "chatml"}, optim={"lr": 1e-2})))
    tok = AutoTokenizer.from_pretrained(adapter)
    rows = len(AutoTokenizer.from_pretrained(base)) + 2
    assert len(tok) == rows
    assert f"base.resize_token_embeddings({rows}) before PeftModel.from_pretrained" in capsys.readouterr().err
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(rows)
    plain = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([tok.apply_chat_template(PROMPTS[0], add_generation_prompt=True)["input_ids"]])
    torch.testing.assert_close(logits(plain, ids), logits(load_for_inference(str(adapter)).model.eval(), ids))
    report = merge_adapter(adapter, tmp_path / "merged")  # merge resizes the base the same way
    assert report.max_abs_logit_diff <= report.tolerance
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").get_input_embeddings().weight.shape[0] == rows


# What each tokenizer without a pad pads with (None: kept as shipped), and for PPO, whose pad must
# be no stop token ("<|pad|>": nothing free, one token is added).
PADS = {
    "llama3": ("<|finetune_right_pad_id|>", "<|finetune_right_pad_id|>"),
    "llama3.0": ("<|reserved_special_token_3|>", "<|reserved_special_token_3|>"),  # the last reserved one
    "mistral": ("[control_9]", "[control_9]"),
    "mixtral": ("<unk>", "<unk>"),
    "gpt2": ("<|endoftext|>", "<|pad|>"),  # eos: masks come from lengths
    "gpt_neox": ("<|padding|>", "<|padding|>"),
    "starcoder2": ("<fim_pad>", "<fim_pad>"),
    "phi3": (None, "<|placeholder2|>"),  # ships pad == eos
    "qwen2": (None, None),
}


@pytest.mark.parametrize("name", PADS)
def test_pad_policy_per_family(name):
    from dataclasses import replace

    from finetune.data.tokenizer import ensure_pad_token, stop_token_ids
    from tests.families import build_tokenizer

    family = BY_NAME.get(name) or replace(BY_NAME["llama3"], specials=[
        t for t in BY_NAME["llama3"].specials if t != "<|finetune_right_pad_id|>"])
    for expected, stops in zip(PADS[name], (None, "ppo"), strict=True):
        tok = build_tokenizer(family)
        shipped, size = tok.pad_token, len(tok)
        ensure_pad_token(tok, set(stop_token_ids(tok)) if stops else None)
        assert tok.pad_token == (expected or shipped)
        assert len(tok) == size + (tok.pad_token == "<|pad|>")


@pytest.mark.parametrize("name", [f.name for f in FAMILIES])
def test_packed_and_padded_batches_compute_each_sample_alone(name):
    """Every family's attention (windows, softcapping, sinks, partial rotary, absolute positions,
    MoE routing) through finetune_varlen: a padding-free row and a padded batch give each sample's
    logits alone, computed with the model's own default attention."""
    from transformers import AutoConfig

    from finetune.train.attention import enable_packed_attention
    from finetune.train.collate import collate_flat, collate_padded

    family = BY_NAME[name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(family.model_type, vocab_size=64, **family.config)
    model = AutoModelForCausalLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(0, 64, (n,), generator=gen).tolist(), "labels": [1] * n}
               for n in (11, 4, 17)]  # longer than the tiny sliding windows (8, 16)
    with torch.no_grad():
        alone = [model(torch.tensor([s["input_ids"]]), use_cache=False).logits[0] for s in samples]
        enable_packed_attention(model)
        flat, padded = collate_flat(samples), collate_padded(samples, pad_id=0)
        flat_logits = model(**flat.model_inputs()).logits[0]
        padded_logits = model(**padded.model_inputs()).logits
    cu = flat.cu_seq_lens.tolist()
    for i, reference in enumerate(alone):
        torch.testing.assert_close(flat_logits[cu[i]:cu[i + 1]], reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(padded_logits[i, :len(reference)], reference, atol=1e-4, rtol=1e-4)


def test_dry_run_plan_names_the_eager_attention(tmp_path, capsys):
    base = save_family(BY_NAME["gemma2"], tmp_path / "base")
    assert run_recipe(recipe_from_dict(sft(base, tmp_path / "out")), dry_run=True) is None
    assert "gemma2 uses attention logit softcapping: packed attention runs" in capsys.readouterr().err
