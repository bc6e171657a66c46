"""Peers' names: TRL / transformers TrainingArguments, TRL script arguments and Axolotl keys -> ours.

Used three ways: an unknown key or flag that is a peer's name gets "did you mean <our key>" with
the value translated; `finetune validate` on an Axolotl or TRL config prints the equivalent
recipe and the keys that have none; `finetune run` on such a file says so in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_PRECISION = {"bf16": "bf16", "fp16": "fp16", "tf32": None}
_OPTIMIZERS = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "adamw_8bit",
    "paged_adamw_32bit": "adamw",
}
# Axolotl's dataset `type` -> our format.
_AXOLOTL_TYPES = {"chat_template": "messages", "alpaca": "alpaca", "sharegpt": "sharegpt",
                  "completion": "text", "input_output": "prompt_completion"}


def _same(v: Any) -> Any:
    return v


def _flag(value_if_true: Any) -> Callable[[Any], Any]:
    """A boolean peer key that sets one of our keys to a fixed value when true (bf16: true)."""
    return lambda v: value_if_true if v in (True, "true", "True", "auto") else None


def _optimizer(v: Any) -> Any:
    return _OPTIMIZERS.get(str(v))


def _report_to(v: Any) -> Any:
    names = [v] if isinstance(v, str) else list(v or [])
    return [n for n in names if n not in ("none", "all")] or None


# peer key -> (our dotted key, translate value -> our value or None when it has no equivalent)
PEER_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    # transformers TrainingArguments / TRL configs
    "learning_rate": ("optim.lr", _same),
    "dataset_num_proc": ("data.num_proc", _same),
    "lr": ("optim.lr", _same),
    "per_device_train_batch_size": ("run.micro_batch_size", _same),
    "gradient_accumulation_steps": ("run.grad_accum", _same),
    "num_train_epochs": ("run.epochs", _same),
    "max_steps": ("run.max_steps", lambda v: None if v in (-1, "-1") else v),
    "bf16": ("run.precision", _flag("bf16")),
    "fp16": ("run.precision", _flag("fp16")),
    "output_dir": ("run.output_dir", _same),
    "seed": ("run.seed", _same),
    "logging_steps": ("run.log_every", _same),
    "save_steps": ("run.save_every", _same),
    "eval_steps": ("run.eval_every", _same),
    "save_total_limit": ("run.keep_last", _same),
    "report_to": ("run.report_to", _report_to),
    "warmup_steps": ("optim.warmup_steps", _same),
    "warmup_ratio": ("optim.warmup_ratio", _same),
    "lr_scheduler_type": ("optim.scheduler", _same),
    "weight_decay": ("optim.weight_decay", _same),
    "max_grad_norm": ("optim.max_grad_norm", _same),
    "adam_epsilon": ("optim.eps", _same),
    "optim": ("optim.name", _optimizer),
    "gradient_checkpointing": ("model.gradient_checkpointing", _same),
    "max_length": ("tokenizer.max_length", _same),
    "max_seq_length": ("tokenizer.max_length", _same),
    "packing": ("data.packing", _same),
    "padding_free": ("data.padding_free", _same),
    "assistant_only_loss": ("trainer.train_on", _flag("assistant")),
    "completion_only_loss": ("trainer.train_on", _flag("completion")),
    "model_name_or_path": ("model.name", _same),
    "trust_remote_code": ("model.trust_remote_code", _same),
    "torch_dtype": ("model.dtype", _same),
    "dtype": ("model.dtype", _same),
    "attn_implementation": ("model.attn_implementation", _same),
    "load_in_4bit": ("model.quantize", _flag("4bit")),
    "load_in_8bit": ("model.quantize", _flag("8bit")),
    "lora_r": ("adapter.r", _same),
    "lora_alpha": ("adapter.alpha", _same),
    "lora_dropout": ("adapter.dropout", _same),
    "lora_target_modules": ("adapter.target_modules", _same),
    "use_dora": ("adapter.use_dora", _same),
    "use_rslora": ("adapter.use_rslora", _same),
    "chat_template_path": ("tokenizer.chat_template", _same),
    "lmbda": ("trainer.distill.on_policy_fraction", _same),  # TRL's GKDConfig
    "teacher_model_name_or_path": ("trainer.distill.teacher", _same),
    # Axolotl
    "base_model": ("model.name", _same),
    "tokenizer_config": ("tokenizer.name", _same),
    "sequence_len": ("tokenizer.max_length", _same),
    "micro_batch_size": ("run.micro_batch_size", _same),
    "num_epochs": ("run.epochs", _same),
    "lr_scheduler": ("optim.scheduler", _same),
    "optimizer": ("optim.name", _optimizer),
    "sample_packing": ("data.packing", _same),
    "val_set_size": ("data.eval_fraction", lambda v: v if v else None),
    "lora_target_linear": ("adapter.target_modules", _flag("all-linear")),
    "chat_template": ("tokenizer.chat_template", lambda v: v if v in ("chatml",) else None),
    "train_on_inputs": ("trainer.train_on", lambda v: "all" if v is True else "assistant"),
    "flash_attention": ("model.attn_implementation", _flag("flash_attention_2")),
}
# Names that are already ours under another section: `optim.learning_rate` -> optim.lr etc.
# (peer keys are looked up by their last part, wherever they were written).


def suggestion(key: str, value: Any = None) -> str | None:
    """' (did you mean optim.lr=0.0001?)' for a peer's key (its last dotted part), else None."""
    name = key.rsplit(".", 1)[-1].lstrip("-").replace("-", "_")
    if name not in PEER_KEYS:
        return None
    ours, translate = PEER_KEYS[name]
    if value is None:
        return f" (did you mean {ours}?)"
    mapped = translate(value)
    if mapped is None:
        return f" (did you mean {ours}? {name}={value!r} has no direct equivalent)"
    return f" (did you mean {ours}={_show(mapped)}?)"


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def peer_kind(data: dict) -> str | None:
    """'Axolotl' or 'TRL' when a YAML mapping is a peer's config rather than a recipe."""
    if not isinstance(data, dict) or isinstance(data.get("model"), dict) or "trainer" in data:
        return None
    keys = set(map(str, data))
    if "base_model" in keys or ("datasets" in keys and isinstance(data.get("datasets"), list)):
        return "Axolotl"
    if "model_name_or_path" in keys or "dataset_name" in keys or len(keys & set(PEER_KEYS)) >= 3:
        return "TRL"
    return None


def translate_config(data: dict, stem: str) -> tuple[dict, list[str]]:
    """(an equivalent recipe as a dict, the peer keys that have no equivalent)."""
    recipe: dict = {"model": {}, "data": {"train": []}, "trainer": {"type": "sft"}, "run": {}}
    unmapped: list[str] = []
    for key, value in data.items():
        key = str(key)
        if key == "datasets" and isinstance(value, list):
            for i, ds in enumerate(value):
                src, missing = _axolotl_dataset(ds)
                recipe["data"]["train"].append(src)
                unmapped += [f"datasets.{i}.{m}" for m in missing]
            continue
        if key == "dataset_name":
            recipe["data"]["train"].append({"path": value})
            continue
        if key in ("adapter", "use_peft"):
            if value in ("lora", "qlora", True):
                recipe.setdefault("adapter", {"type": "lora"})
                if value == "qlora":
                    recipe["model"]["quantize"] = "4bit"
            continue
        if key == "rl" or key == "dataset_text_field":
            unmapped.append(key)
            continue
        if key not in PEER_KEYS:
            unmapped.append(key)
            continue
        ours, translate = PEER_KEYS[key]
        mapped = translate(value)
        if mapped is None:
            if value not in (False, None, "false"):
                unmapped.append(key)
            continue
        section, _, name = ours.partition(".")
        if section == "adapter":
            recipe.setdefault("adapter", {"type": "lora"})
        recipe.setdefault(section, {})[name] = mapped
    if not recipe["data"]["train"]:
        recipe["data"]["train"].append({"path": "data/train.jsonl"})
        unmapped.append("(no dataset: data.train.0.path is a placeholder)")
    recipe["run"].setdefault("output_dir", f"runs/{stem}")
    if not recipe["model"]:
        recipe["model"]["name"] = "org/model"
        unmapped.append("(no model: model.name is a placeholder)")
    order = ("model", "tokenizer", "data", "adapter", "trainer", "optim", "run")
    return {k: recipe[k] for k in order if recipe.get(k)}, unmapped


def _axolotl_dataset(ds: Any) -> tuple[dict, list[str]]:
    if not isinstance(ds, dict) or "path" not in ds:
        return {"path": str(ds)}, []
    src: dict = {"path": ds["path"]}
    missing = []
    kind = ds.get("type")
    if kind is not None:
        fmt = _AXOLOTL_TYPES.get(str(kind))
        if fmt is None:
            missing.append(f"type={kind}")
        else:
            src["format"] = fmt
    if ds.get("split"):
        src["split"] = ds["split"]
    if ds.get("name"):
        src["subset"] = ds["name"]
    if ds.get("field_messages"):
        src["columns"] = {"messages": ds["field_messages"]}
    missing += [k for k in ds if k not in ("path", "type", "split", "name", "field_messages")]
    return src, missing
