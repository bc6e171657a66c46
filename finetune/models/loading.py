"""Causal LMs for training: with models/reward_model.py, the only place that calls from_pretrained / from_config.

Decides the weight dtype, attention implementation, embedding resize for added tokens,
gradient checkpointing and the optional LoRA adapter, and reports parameter counts for the plan.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from finetune.errors import RecipeError, UserError
from finetune.models.precision import mixed_precision
from finetune.recipe.schema import Recipe

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelInfo:
    total_params: int
    trainable_params: int
    dtype: str
    source: str
    notes: list[str]


def weight_dtype(recipe: Recipe) -> torch.dtype:
    """`auto`: fp32 master weights for full fine-tuning (mixed precision autocasts the maths); a
    frozen base under an adapter on a GPU is stored in the run's 16-bit precision (bf16, or fp16 on
    GPUs without native bf16; the base never steps), fp32 when the run computes in fp32."""
    if recipe.model.dtype != "auto":
        return DTYPES[recipe.model.dtype]
    if recipe.adapter is not None and torch.cuda.is_available():
        return run_half_dtype(recipe) or torch.float32
    return torch.float32


def run_half_dtype(recipe: Recipe) -> torch.dtype | None:
    """The 16-bit dtype the run's autocast computes in (run.precision, auto resolved), or None (fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(recipe.run.precision))


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


# Learned absolute position tables: a position past the table is an index error at the first forward.
_ABSOLUTE_POSITIONS = {"gpt2", "gpt_bigcode", "opt", "biogpt", "xglm", "gpt_neo"}


def check_positions(recipe: Recipe, config: PretrainedConfig) -> str | None:
    """tokenizer.max_length against the model's positions: an error where positions are a learned
    table, a note where they are rotary (runs, but past the trained context quality is not assured)."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    length = recipe.tokenizer.max_length
    if not isinstance(limit, int) or length <= limit:
        return None
    if config.model_type in _ABSOLUTE_POSITIONS:
        raise RecipeError(f"tokenizer.max_length: {length} is beyond the {limit} positions of this "
                          f"{config.model_type} model (a learned position table): use at most {limit}")
    return (f"tokenizer.max_length {length} is beyond the model's {limit} trained positions "
            f"({config.model_type}): sequences that long run, but quality past {limit} is not assured")


def load_model(recipe: Recipe, tokenizer=None) -> tuple[torch.nn.Module, ModelInfo]:
    """Builds (init_config) or loads (name) the causal LM ready for training."""
    m = recipe.model
    dtype = weight_dtype(recipe)
    notes: list[str] = []
    kwargs = {"dtype": dtype}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.quantize is not None:
        kwargs.update(quantization_kwargs(recipe))
    if m.init_config is not None:
        config = load_config(recipe, tokenizer)
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        source = f"from scratch ({config.model_type})"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                m.name, revision=m.revision, trust_remote_code=m.trust_remote_code,
                # Pickled .bin weights can run code when unpickled: only on request, and then
                # transformers loads them with torch.load(weights_only=True).
                use_safetensors=None if m.allow_bin else True, **kwargs,
            )
        except (OSError, ValueError) as e:
            hint = ""
            if not m.allow_bin and (".bin" in str(e) or "safetensors" in str(e).lower()):
                hint = " (only safetensors weights are loaded; set model.allow_bin: true to accept .bin files)"
            raise UserError(f"model.name: cannot load {m.name!r}: {_first_line(e)}{hint}") from None
        source = m.name
    prepare_for_training(model, recipe, tokenizer, notes)
    if recipe.adapter is not None:
        model = add_adapter(model, recipe)
        notes += adapter_notes(model)
    total, trainable = count_params(model)
    return model, ModelInfo(total, trainable, str(dtype).removeprefix("torch."), source, notes)


# ----------------------------------------------------------------------------------------------
# Quantized loading (QLoRA)

# transformers' own floor for bitsandbytes quantization (transformers.utils.import_utils).
BNB_MIN_VERSION = "0.46.1"


def quant_compute_dtype(recipe: Recipe) -> torch.dtype:
    """The dtype bitsandbytes computes in: an explicit model.dtype, else on a GPU the run's autocast
    dtype (bf16 natively, fp16 on older GPUs, fp32 for precision fp32), fp32 on the CPU (where bf16
    matmuls are slow and the 4-bit path exists for tests and smoke runs)."""
    if recipe.model.dtype in ("bfloat16", "float16"):
        return DTYPES[recipe.model.dtype]
    if torch.cuda.is_available():
        return run_half_dtype(recipe) or torch.float32
    return torch.float32


def check_quantization_supported(recipe: Recipe) -> list[str]:
    """Raises RecipeError when model.quantize cannot work here; returns notes for the plan.

    Loads no weights, but imports torch and bitsandbytes and quantizes one 64x64 layer on the
    device that training will use: whether a bitsandbytes build supports a device is only
    reliably known by trying (older builds are CUDA-only; recent ones also run on the CPU).
    """
    q = recipe.model.quantize
    if q is None:
        return []
    if recipe.model.init_config is not None:
        raise RecipeError(f"model.quantize: {q} quantizes pretrained weights; a model built from "
                          "model.init_config has none (use model.name, or model.quantize=null)")
    if recipe.adapter is None:
        raise RecipeError(f"model.quantize: a {q} base cannot be fine-tuned in full; add an adapter: "
                          "section (QLoRA), or set model.quantize=null")
    import importlib.metadata
    import importlib.util

    from packaging.version import Version

    if importlib.util.find_spec("bitsandbytes") is None:
        raise RecipeError(f"model.quantize: {q} needs the bitsandbytes package, which is not installed "
                          "(pip install bitsandbytes), or set model.quantize=null")
    version = importlib.metadata.version("bitsandbytes")
    if Version(version) < Version(BNB_MIN_VERSION):
        raise RecipeError(f"model.quantize: bitsandbytes {version} is too old for transformers' "
                          f"quantized loading (needs >= {BNB_MIN_VERSION})")
    device = rank_device()
    compute = quant_compute_dtype(recipe)
    problem = _bnb_probe(q, device, compute)
    if problem:
        raise RecipeError(f"model.quantize: {q} is not supported by bitsandbytes {version} on this machine "
                          f"({device}): {problem}; run on a CUDA GPU or set model.quantize=null")
    what = (f"4-bit NF4 with double quantization, compute {str(compute).removeprefix('torch.')}" if q == "4bit"
            else "8-bit LLM.int8() (fp16 matmuls)")
    return [f"base quantized on {device}: {what} (bitsandbytes {version}); gradient checkpointing on (QLoRA)"]


@functools.cache
def _bnb_probe(quantize: str, device: str, compute: torch.dtype) -> str | None:
    """None when one quantized layer runs forward on `device`, else why not (one line)."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # noqa: BLE001 - a broken native library surfaces here in many forms
        return f"import failed: {_first_line(e)}"
    # Builds without this attribute (before the multi-backend work) are CUDA-only.
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device not in supported:
        return f"this build supports {', '.join(sorted(supported))} only"
    try:
        if quantize == "4bit":
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute, quant_type="nf4")
            x = torch.randn(2, 64, dtype=compute)
        else:
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
            x = torch.randn(2, 64, dtype=torch.float16)
        y = layer.to(device)(x.to(device))
        if not torch.isfinite(y).all():
            return "a quantized layer produced non-finite outputs"
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        return f"{type(e).__name__}: {_first_line(e)}"
    return None


def quantization_kwargs(recipe: Recipe) -> dict:
    """from_pretrained kwargs for model.quantize: the BitsAndBytesConfig and the device to load on."""
    from transformers import BitsAndBytesConfig

    check_quantization_supported(recipe)
    compute = quant_compute_dtype(recipe)
    if recipe.model.quantize == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
        # prepare_model_for_kbit_training keeps activations in fp32, and bitsandbytes then logs a
        # warning for every int8 matmul of every step; the cast is expected, the flood is noise.
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_warning)
    # Weights are quantized as they are placed, so each process loads straight onto its own GPU.
    return {"quantization_config": config, "device_map": {"": rank_device()}}


def rank_device() -> str:
    """This process's device: cuda:LOCAL_RANK under a multi-GPU launcher. Named explicitly, so no
    allocation lands on GPU 0 (a CUDA context there per rank) whatever the current device is."""
    import os

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(torch.cuda.device_count(), 1)}"


def _drop_int8_cast_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quantization_of(model: torch.nn.Module) -> str | None:
    if getattr(model, "is_loaded_in_4bit", False):
        return "4bit"
    if getattr(model, "is_loaded_in_8bit", False):
        return "8bit"
    return None


# ----------------------------------------------------------------------------------------------
# LoRA adapters


@dataclass
class AdapterSetup:
    """What add_adapter decided, attached to the returned model as `adapter_setup` (see adapter_notes)."""

    target_modules: list[str]  # leaf names of the layers that got LoRA
    new_token_ids: list[int]  # embedding rows added for new tokens (resize), trained by the adapter
    new_token_training: str | None  # "trainable_token_indices" | "modules_to_save" | None
    new_token_layers: list[str]
    quantized: str | None  # "4bit" | "8bit" | None

    def notes(self) -> list[str]:
        notes = [f"LoRA on {', '.join(self.target_modules)}"]
        if self.quantized:
            notes.append(f"QLoRA: {self.quantized} base prepared with prepare_model_for_kbit_training, "
                         "gradient checkpointing on")
        if self.new_token_training == "trainable_token_indices":
            notes.append(f"{len(self.new_token_ids)} added token rows trained in {', '.join(self.new_token_layers)} "
                         "(peft trainable_token_indices: only those rows, saved with the adapter)")
        elif self.new_token_training == "modules_to_save":
            notes.append(f"{len(self.new_token_ids)} added token rows trained through adapter.modules_to_save "
                         f"({', '.join(self.new_token_layers)} in full)")
        return notes


def adapter_notes(model: torch.nn.Module) -> list[str]:
    """Plan notes for a model returned by add_adapter ([] for a model without an adapter)."""
    setup = getattr(model, "adapter_setup", None)
    return setup.notes() if setup is not None else []


def prepare_for_training(model: torch.nn.Module, recipe: Recipe, tokenizer, notes: list[str]) -> None:
    """Shared by every model kind: resize for added tokens, pad id, activation checkpointing."""
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        how = (f"; to load the adapter with plain peft, call base.resize_token_embeddings({len(tokenizer)}) "
               "before PeftModel.from_pretrained") if recipe.adapter is not None else ""
        notes.append(f"resized embeddings {old} -> {len(tokenizer)} for added tokens{how}")
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if recipe.model.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (adapters) and torch.compile.
        # transformers >= 5.2x names it activation checkpointing (the old name goes in v6).
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False


def add_adapter(model: torch.nn.Module, recipe: Recipe, new_token_ids: list[int] | None = None) -> torch.nn.Module:
    """Wraps the model in a peft LoRA adapter (QLoRA when it was loaded quantized).

    Rows of tokens that this run added to the vocabulary (`new_token_ids`; by default the rows
    beyond the checkpoint's vocab_size) are random and must be trained: they go through peft's
    trainable_token_indices, which trains and saves only those rows of the input embedding and
    of an untied output head (a tied head follows the embedding). A layer the user already put
    in adapter.modules_to_save trains in full instead.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    a = recipe.adapter
    targets = resolve_target_modules(model, a.target_modules)
    check_modules_to_save(model, a.modules_to_save)
    new_ids = added_token_ids(model, recipe) if new_token_ids is None else list(new_token_ids)
    token_layers, how = _new_token_layers(model, new_ids, a.modules_to_save)
    quantized = quantization_of(model)
    if quantized:
        # Casts norms/embeddings to fp32 and freezes the base; non-reentrant checkpointing as in load_model.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        model.config.use_cache = False
    config = LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules,
        modules_to_save=a.modules_to_save, use_dora=a.use_dora, use_rslora=a.use_rslora,
        trainable_token_indices={name: new_ids for name in token_layers} or None,
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise RecipeError(f"adapter: {_first_line(e)}; the model's linear layers are: "
                          f"{', '.join(linear_layer_names(model))}") from None
    # peft keeps LoRA weights in fp32 but copies modules_to_save in the base's dtype; an fp16 base
    # (GPUs without native bf16) would then train fp16 parameters, which the fp16 loss scaler
    # refuses to unscale. Trained weights stay fp32; autocast computes in fp16.
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
    peft_model.adapter_setup = AdapterSetup(targets, new_ids, how, token_layers if how else [], quantized)
    return peft_model


def is_tied_token_key(model: torch.nn.Module, key: str) -> bool:
    """Whether a saved adapter key holds the trainable token rows of a layer tied to the embedding's.

    With a resized vocabulary peft saves the output head's entries beside the embedding's, the
    tied head's token rows included; that layer owns no rows (it reads the embedding adapter's),
    so loading reports the key as unexpected. Loaders skip such keys.
    """
    if ".trainable_tokens" not in key:
        return False
    try:
        owner = model.get_submodule(key.split(".trainable_tokens")[0])
    except AttributeError:
        return False
    return getattr(owner, "tied_adapter", None) is not None


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """Distinct leaf names of the layers LoRA can target by name, the output head excluded."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"  # GPT-2's Conv1D
        if linear and module is not head and name:
            names.setdefault(name.rsplit(".", 1)[-1])
    return list(names)


def resolve_target_modules(model: torch.nn.Module, target: str | list[str]) -> list[str]:
    """The leaf names LoRA will wrap; RecipeError naming the linear layers when a name matches nothing.

    peft's rules: a list entry matches a module whose full name equals it or ends in ".entry";
    a string other than "all-linear" is a regular expression over full module names.
    """
    linear = linear_layer_names(model)
    if target == "all-linear":
        return linear
    module_names = [n for n, _ in model.named_modules() if n]
    if isinstance(target, str):
        matched = [n for n in module_names if re.fullmatch(target, n)]
        if not matched:
            raise RecipeError(f"adapter.target_modules: the pattern {target!r} matches no module; the model's "
                              f"linear layers are: {', '.join(linear)} (or use all-linear)")
        return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in matched))
    missing = [t for t in target if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        raise RecipeError(f"adapter.target_modules: {', '.join(map(repr, missing))} not in the model; its "
                          f"linear layers are: {', '.join(linear)} (or use all-linear)")
    return list(target)


def check_modules_to_save(model: torch.nn.Module, names: list[str] | None) -> None:
    module_names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names or () if not any(n == t or n.endswith("." + t) for n in module_names)]
    if missing:
        owners = dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                               if n and any(True for _ in m.parameters(recurse=False)))
        raise RecipeError(f"adapter.modules_to_save: {', '.join(map(repr, missing))} not in the model; its "
                          f"layers with weights are: {', '.join(owners)}")


def added_token_ids(model: torch.nn.Module, recipe: Recipe) -> list[int]:
    """Embedding rows beyond the checkpoint's vocab_size, i.e. tokens added by this run (resized)."""
    if recipe.model.name is None:  # built from scratch: every row is new and trains anyway
        return []
    try:
        vocab = load_config(recipe).get_text_config().vocab_size
    except UserError:
        return []
    rows = model.get_input_embeddings().weight.shape[0]
    return list(range(vocab, rows)) if vocab and rows > vocab else []


def _new_token_layers(model, new_ids: list[int], modules_to_save: list[str] | None) -> tuple[list[str], str | None]:
    """Which layers get trainable_token_indices for the new rows, and how the rows are trained."""
    if not new_ids:
        return [], None
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    layers = [names[id(embed)]]
    # A tied head shares the embedding's rows: peft ties its token adapter to the embedding's.
    if head is not None and head.weight is not embed.weight:
        layers.append(names[id(head)])
    saved = set(modules_to_save or ())
    wanted = [n for n in layers if n not in saved]
    if not wanted:
        return layers, "modules_to_save"
    return wanted, "trainable_token_indices"

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
