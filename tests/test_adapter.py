"""LoRA / DoRA / rsLoRA / QLoRA through run_recipe on a tiny saved llama: what trains, what is saved, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import finetune.models.loading as model_mod
from finetune.data.tokenizer import train_bpe_tokenizer
from finetune.errors import RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import crash_after_checkpoint, read_losses, tiny_llama, tiny_pretrain_recipe, write

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"}
LINEAR = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def corpus_lines() -> list[str]:
    # ChatML markers in the text: once the chatml template adds them as tokens, their new
    # embedding rows are inputs too, so both the embedding and the head rows get gradients.
    return [f"<|im_start|>{a} + {b} = {a + b}<|im_end|>" for a in range(12) for b in range(6)]


def make_base(tmp: Path, tied: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """A saved tiny llama ("the local dir a user would load") and its BPE tokenizer, which lacks the
    ChatML tokens: a recipe with chat_template chatml adds two and resizes the embeddings."""
    tok = train_bpe_tokenizer(corpus_lines(), vocab_size=300, special_tokens=())
    tok.save_pretrained(tmp / "tok")
    tiny_llama(seed, vocab_size=len(tok), tie_word_embeddings=tied, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id).save_pretrained(tmp / "base")
    return tmp / "base", tmp / "tok"


def lora_recipe(tmp: Path, base: Path, tok: Path, adapter: dict | None = None, model: dict | None = None,
                **run) -> dict:
    data = tiny_pretrain_recipe(tmp, **run)
    write(tmp / "chat_corpus.txt", "\n\n".join(corpus_lines()) + "\n")
    data["data"]["train"][0]["path"] = str(tmp / "chat_corpus.txt")
    data["model"] = {"name": str(base), **(model or {})}
    data["tokenizer"] = {"name": str(tok), "max_length": 32, "chat_template": "chatml"}
    data["adapter"] = {"r": 4, "alpha": 8, **(adapter or {})}
    data["optim"]["lr"] = 2e-2
    return data


@pytest.fixture
def spy_model(monkeypatch):
    """Captures the model that load_model hands the trainer."""
    seen: dict = {}
    real = model_mod.load_model

    def load_model(recipe, tokenizer=None):
        model, info = real(recipe, tokenizer)
        seen["model"], seen["info"] = model, info
        return model, info

    monkeypatch.setattr(model_mod, "load_model", load_model)
    return seen


def test_lora_trains_only_the_adapter_and_the_new_token_rows(in_tmp, spy_model):
    base, tok = make_base(in_tmp)
    before = load_file(base / "model.safetensors")
    final = run_recipe(recipe_from_dict(lora_recipe(in_tmp, base, tok, max_steps=10)))
    model = spy_model["model"]
    n = len(AutoTokenizer.from_pretrained(tok))  # ids n, n+1: <|im_start|>, <|im_end|>

    loss = read_losses(in_tmp / "out")
    assert all(math.isfinite(x) for x in loss) and loss[-1] < loss[0] - 0.2
    setup = model.adapter_setup
    assert setup.new_token_ids == [n, n + 1] and setup.new_token_training == "trainable_token_indices"
    assert setup.new_token_layers == ["embed_tokens", "lm_head"]
    assert any("trainable_token_indices" in n for n in model_mod.adapter_notes(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    # base frozen: every base weight equals the saved checkpoint (the resized embeddings on their old rows)
    for name, p in model.get_base_model().named_parameters():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        key = name.replace(".base_layer", "").replace(".token_adapter", "")
        assert torch.equal(p.detach()[: before[key].shape[0]], before[key]), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)
    for layer in (model.base_model.model.model.embed_tokens, model.base_model.model.lm_head):
        adapter = layer.token_adapter
        assert not torch.equal(adapter.trainable_tokens_delta["default"], adapter.trainable_tokens_original["default"])

    # final/ holds only the adapter (+ tokenizer): no config.json, no transformer weights
    assert final == in_tmp / "out" / "final"
    assert {p.name for p in final.iterdir()} == ADAPTER_FILES
    keys = load_file(final / "adapter_model.safetensors").keys()
    assert all("lora_" in k or ".token_adapter." in k for k in keys)
    assert json.loads((final / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "embed_tokens": [n, n + 1], "lm_head": [n, n + 1]}


@pytest.mark.parametrize("variant", ["use_dora", "use_rslora"])
def test_dora_and_rslora_smoke(in_tmp, variant):
    base, tok = make_base(in_tmp)
    data = lora_recipe(in_tmp, base, tok, adapter={variant: True, "target_modules": ["q_proj", "v_proj"]},
                       max_steps=2)
    final = run_recipe(recipe_from_dict(data))
    assert all(math.isfinite(x) for x in read_losses(in_tmp / "out"))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config[variant] is True and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    magnitudes = [k for k in load_file(final / "adapter_model.safetensors") if "lora_magnitude_vector" in k]
    assert bool(magnitudes) == (variant == "use_dora")


@pytest.mark.parametrize("tied", [False, True])
def test_resumed_adapter_run_equals_uninterrupted(in_tmp, monkeypatch, tied):
    base, tok = make_base(in_tmp, tied=tied)
    data = lora_recipe(in_tmp, base, tok, adapter={"dropout": 0.1}, max_steps=6, save_every=2)

    def run(out: str) -> Path:
        return run_recipe(recipe_from_dict(data | {"run": data["run"] | {"output_dir": str(in_tmp / out)}}))

    run("full")
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run("crash")
    ckpt_model = in_tmp / "crash" / "checkpoints" / "step-4" / "model"
    assert (ckpt_model / "adapter_model.safetensors").is_file() and not (ckpt_model / "model.safetensors").exists()
    run("crash")
    a = load_file(in_tmp / "full" / "final" / "adapter_model.safetensors")
    b = load_file(in_tmp / "crash" / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert read_losses(in_tmp / "full")[-2:] == read_losses(in_tmp / "crash")[-2:]


def tiny_model_and_recipe(tmp: Path, adapter: dict):
    model = tiny_llama(None, vocab_size=64)
    data = tiny_pretrain_recipe(tmp)
    data["adapter"] = adapter
    return model, recipe_from_dict(data)


@pytest.mark.parametrize("adapter, match", [
    ({"target_modules": ["q_proj", "qkv_proj"]}, r"'qkv_proj' not in the model; its linear layers are: " + LINEAR),
    ({"target_modules": r".*\.attn\..*"}, r"matches no module; the model's linear layers are: " + LINEAR),
    ({"modules_to_save": ["embeddings"]}, r"modules_to_save: 'embeddings' not in the model; its layers with weights "
                                          r"are: embed_tokens, q_proj"),
    ({"target_modules": ["norm"]}, r"adapter: .*; the model's linear layers are: " + LINEAR),
])
def test_bad_target_modules_name_the_linear_layers(in_tmp, adapter, match):
    model, recipe = tiny_model_and_recipe(in_tmp, adapter)
    with pytest.raises(RecipeError, match=match):
        model_mod.add_adapter(model, recipe)


def test_no_added_tokens_means_no_token_training(in_tmp):
    model, recipe = tiny_model_and_recipe(in_tmp, {"r": 2, "target_modules": ["q_proj"]})
    peft_model = model_mod.add_adapter(model, recipe)
    setup = peft_model.adapter_setup
    assert setup.target_modules == ["q_proj"] and setup.new_token_ids == [] and setup.new_token_training is None
    assert model_mod.adapter_notes(peft_model) == ["LoRA on q_proj"]
    assert model_mod.adapter_notes(model.get_base_model() if hasattr(model, "get_base_model") else model) == []


def test_quantization_errors_are_clear(in_tmp, monkeypatch):
    base, tok = make_base(in_tmp)
    data = lora_recipe(in_tmp, base, tok, model={"quantize": "4bit"})
    check = model_mod.check_quantization_supported
    scratch = tiny_pretrain_recipe(in_tmp)
    scratch["model"]["quantize"] = "4bit"
    scratch["adapter"] = {"r": 4}
    with pytest.raises(RecipeError, match="model.init_config has none"):
        check(recipe_from_dict(scratch))
    with pytest.raises(RecipeError, match="cannot be fine-tuned in full; add an adapter"):
        check(recipe_from_dict({k: v for k, v in data.items() if k != "adapter"}))

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real_find_spec(name, *a))
    with pytest.raises(RecipeError, match="needs the bitsandbytes package, which is not installed"):
        check(recipe_from_dict(data))
    monkeypatch.undo()

    # A bitsandbytes build without CPU support, on a machine without CUDA: refused before any weight loads.
    import bitsandbytes

    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model_mod._bnb_probe.cache_clear()
    try:
        with pytest.raises(RecipeError, match=r"model.quantize: 4bit is not supported by bitsandbytes .* \(cpu\): "
                                              r"this build supports cuda only; run on a CUDA GPU or set"):
            run_recipe(recipe_from_dict(data))
        assert not (in_tmp / "out" / "final").exists()
    finally:
        model_mod._bnb_probe.cache_clear()


def _quantization_or_skip(recipe) -> None:
    try:
        model_mod.check_quantization_supported(recipe)
    except RecipeError as e:  # this machine's bitsandbytes cannot: the error path is tested above
        pytest.skip(str(e))


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_runs_on_this_machine(in_tmp, spy_model, bits):
    """bitsandbytes >= 0.48 quantizes on the CPU too (4-bit NF4 and LLM.int8): the QLoRA path runs here."""
    base, tok = make_base(in_tmp)
    recipe = recipe_from_dict(lora_recipe(in_tmp, base, tok, model={"quantize": bits}, max_steps=3))
    _quantization_or_skip(recipe)
    final = run_recipe(recipe)
    model = spy_model["model"]
    import bitsandbytes as bnb

    layer = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
    assert model.adapter_setup.quantized == bits
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())  # QLoRA turns it on
    assert all(math.isfinite(x) for x in read_losses(in_tmp / "out"))
    assert {p.name for p in final.iterdir()} == ADAPTER_FILES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bitsandbytes 4-bit on the GPU)")
def test_qlora_4bit_on_gpu_computes_in_bf16(in_tmp, spy_model):
    base, tok = make_base(in_tmp)
    recipe = recipe_from_dict(lora_recipe(in_tmp, base, tok, model={"quantize": "4bit"}, max_steps=3))
    notes = model_mod.check_quantization_supported(recipe)
    assert "on cuda" in notes[0]
    run_recipe(recipe)
    layer = spy_model["model"].base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.weight.device.type == "cuda"
    assert layer.compute_dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    assert all(math.isfinite(x) for x in read_losses(in_tmp / "out"))
