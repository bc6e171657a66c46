"""The only place that calls from_pretrained / from_config for training models.

Decides the weight dtype, attention implementation, embedding resize for added tokens,
gradient checkpointing and the optional LoRA adapter, and reports parameter counts for the plan.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from finetune.errors import RecipeError, UserError
from finetune.recipe import Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelInfo:
    total_params: int
    trainable_params: int
    dtype: str
    source: str
    notes: list[str]


def weight_dtype(recipe: Recipe) -> torch.dtype:
    """`auto`: fp32 master weights for full fine-tuning (mixed precision autocasts the maths),
    bf16 for a frozen base under an adapter on a GPU that supports it (the base never steps)."""
    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    if recipe.adapter is not None and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_config(recipe: Recipe, tokenizer=None) -> PretrainedConfig:
    """The architecture config: from init_config (from scratch) or from the model reference."""
    m = recipe.model
    if m.init_config is not None:
        if isinstance(m.init_config, str):
            path = Path(m.init_config)
            cfg_dict = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        else:
            cfg_dict = dict(m.init_config)
        model_type = cfg_dict.pop("model_type", None)
        if not model_type:
            raise RecipeError("model.init_config: needs model_type (e.g. llama, qwen2, mistral)")
        try:
            config = AutoConfig.for_model(model_type, **cfg_dict)
        except (ValueError, KeyError, TypeError) as e:
            raise RecipeError(f"model.init_config: {e}") from None
        if tokenizer is not None:
            # A from-scratch model is sized to its tokenizer and shares its special ids.
            config.vocab_size = len(tokenizer)
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                setattr(config, name, getattr(tokenizer, name))
        return config
    try:
        return AutoConfig.from_pretrained(
            m.name, revision=m.revision, trust_remote_code=m.trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot load the config of {m.name!r}: {_first_line(e)}") from None


def load_model(recipe: Recipe, tokenizer=None) -> tuple[torch.nn.Module, ModelInfo]:
    """Builds (init_config) or loads (name) the causal LM ready for training."""
    m = recipe.model
    dtype = weight_dtype(recipe)
    notes: list[str] = []
    kwargs = {"dtype": dtype}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.quantize is not None:
        raise RecipeError("model.quantize: quantized loading arrives with the adapter work; use null for now")
    if m.init_config is not None:
        config = load_config(recipe, tokenizer)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        source = f"from scratch ({config.model_type})"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                m.name, revision=m.revision, trust_remote_code=m.trust_remote_code,
                use_safetensors=True, **kwargs,
            )
        except (OSError, ValueError) as e:
            raise UserError(f"model.name: cannot load {m.name!r}: {_first_line(e)}") from None
        source = m.name
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        notes.append(f"resized embeddings {old} -> {len(tokenizer)} for added tokens")
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if m.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (adapters) and torch.compile.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if recipe.adapter is not None:
        model = add_adapter(model, recipe)
    total, trainable = count_params(model)
    return model, ModelInfo(total, trainable, str(dtype).removeprefix("torch."), source, notes)


def add_adapter(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    a = recipe.adapter
    config = LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules,
        modules_to_save=a.modules_to_save, use_dora=a.use_dora, use_rslora=a.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise RecipeError(f"adapter.target_modules: {_first_line(e)}") from None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return total, trainable


def count_params_meta(recipe: Recipe, tokenizer=None) -> tuple[int, int]:
    """Parameter counts without allocating weights (for --dry-run)."""
    config = load_config(recipe, tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if recipe.adapter is not None:
        model = add_adapter(model, recipe)
    return count_params(model)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
