"""One precision decision for every place that makes one (finetune.models.precision), checked on
pretend GPUs: torch.cuda's availability, device properties and bf16 query are monkeypatched to
answer as an A100 (sm80), a V100 (sm70), a T4 (sm75) or no GPU would.

A V100 or T4 answers is_bf16_supported() True (emulated bf16) but False without emulation; bf16
there is slow and the flash kernel refuses it, so `auto` must pick fp16 (with the loss scaler)."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.models import loading, precision
from finetune.recipe.schema import recipe_from_dict
from finetune.train import attention, engine
from tests.conftest import TINY_LLAMA

GPUS = {"A100": (8, 0), "H100": (9, 0), "V100": (7, 0), "T4": (7, 5), "none": None}
# What `precision: auto` must give, and the 16-bit dtype every other decision must agree with.
EXPECTED = {"A100": ("bf16", torch.bfloat16), "H100": ("bf16", torch.bfloat16),
            "V100": ("fp16", torch.float16), "T4": ("fp16", torch.float16), "none": ("no", None)}


def pretend_gpu(monkeypatch, name: str) -> None:
    capability = GPUS[name]
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)

    def properties(device=None):
        if capability is None:
            raise AssertionError("asked for CUDA device properties without CUDA")
        return SimpleNamespace(major=capability[0], minor=capability[1], name=name, total_memory=16 * 2**30)

    def is_bf16_supported(including_emulation: bool = True) -> bool:  # as torch.cuda answers on that GPU
        return capability is not None and (capability >= (8, 0) or including_emulation)

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)


def recipe(precision_: str = "auto", adapter: bool = True, dtype: str = "auto"):
    return recipe_from_dict({
        "model": {"init_config": dict(TINY_LLAMA), "dtype": dtype},
        "adapter": {"r": 4} if adapter else None,
        "data": {"train": [{"path": "x"}]}, "trainer": {"type": "sft"},
        "run": {"output_dir": "x", "precision": precision_}})


@pytest.mark.parametrize("gpu", list(GPUS))
def test_every_decision_agrees_on_each_gpu(monkeypatch, gpu):
    pretend_gpu(monkeypatch, gpu)
    mixed, half = EXPECTED[gpu]
    assert precision.auto_precision() == mixed
    assert engine.resolve_precision(recipe()) == mixed  # accelerate's autocast + loss scaler
    assert precision.half_dtype() == half
    assert precision.inference_dtype() == (half or torch.float32)  # generate / eval / reward model
    assert precision.inference_dtype("cpu") == torch.float32
    assert loading.weight_dtype(recipe()) == (half or torch.float32)  # frozen base under LoRA
    assert loading.weight_dtype(recipe(adapter=False)) == torch.float32  # full FT: fp32 master weights
    assert loading.quant_compute_dtype(recipe()) == (half or torch.float32)  # QLoRA's compute dtype
    # fp16 and packing on a pre-Ampere GPU: the SDPA fallback, not the flash varlen kernel
    # (which raises "FlashAttention only supports Ampere GPUs or newer" there).
    cuda = torch.device("cuda")
    assert attention._can_use_flash(cuda, half or torch.float32, 64, 0.0, None) == (mixed == "bf16")
    assert not attention._can_use_flash(cuda, torch.float16, 64, 0.0, None) or GPUS[gpu] >= (8, 0)


@pytest.mark.parametrize("gpu", ["A100", "V100"])
def test_explicit_precision_is_followed_by_the_weights(monkeypatch, gpu):
    pretend_gpu(monkeypatch, gpu)
    assert engine.resolve_precision(recipe("fp32")) == "no"
    assert loading.weight_dtype(recipe("fp32")) == torch.float32  # fp32 maths, fp32 base
    assert loading.quant_compute_dtype(recipe("fp32")) == torch.float32
    assert loading.weight_dtype(recipe("fp16")) == torch.float16
    assert loading.weight_dtype(recipe(dtype="bfloat16")) == torch.bfloat16  # model.dtype wins
    assert loading.quant_compute_dtype(recipe(dtype="float16")) == torch.float16


def test_flash_kernel_is_not_chosen_without_ampere_even_in_bf16(monkeypatch):
    pretend_gpu(monkeypatch, "T4")
    assert not attention._can_use_flash(torch.device("cuda"), torch.bfloat16, 64, 0.0, None)
    pretend_gpu(monkeypatch, "A100")
    if attention._varlen_kernel()[0] is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    assert attention._can_use_flash(torch.device("cuda"), torch.bfloat16, 64, 0.0, None)
    assert not attention._can_use_flash(torch.device("cpu"), torch.bfloat16, 64, 0.0, None)


def test_env_report_names_the_auto_precision(monkeypatch):
    from finetune.run import doctor

    pretend_gpu(monkeypatch, "V100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "nccl", SimpleNamespace(version=lambda: (2, 21, 5)), raising=False)
    gpu_lines = [line for line in doctor.report() if line.startswith("gpu 0")]
    assert gpu_lines == ["gpu 0         V100, 16.0 GiB, sm 7.0, precision auto: fp16"]


def test_only_the_precision_module_asks_torch_about_bf16():
    """is_bf16_supported() counts emulation; every decision goes through finetune.models.precision."""
    pkg = Path(precision.__file__).resolve().parent.parent
    callers = []
    for path in pkg.rglob("*.py"):
        if path.name == "precision.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("is_bf16_supported", "get_device_capability"):
                callers.append(f"{path.relative_to(pkg)}:{node.lineno}")
    assert callers == []


def test_fp16_base_trains_fp32_parameters_only():
    """An fp16 frozen base (auto on a V100/T4): the loss scaler cannot unscale fp16 gradients, so
    every trained parameter (LoRA and modules_to_save copies) must be fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**TINY_LLAMA, "vocab_size": 64, "tie_word_embeddings": False}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg), dtype=torch.float16)
    r = recipe_from_dict({"model": {"init_config": dict(TINY_LLAMA)}, "data": {"train": [{"path": "x"}]},
                          "adapter": {"r": 4, "modules_to_save": ["lm_head"]}, "trainer": {"type": "sft"},
                          "run": {"output_dir": "x"}})
    peft_model = loading.add_adapter(model, r, new_token_ids=[])
    trained = {n: p.dtype for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n for n in trained) and any("lora_A" in n for n in trained)
    assert set(trained.values()) == {torch.float32}
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    assert frozen == {torch.float16}  # the base keeps its memory saving
