"""Reward models: the rendering, the read-out and the loss, shared by training and scoring.

A reward model is a causal LM with a one-output linear head (transformers'
*ForSequenceClassification, num_labels=1). Its reward for a conversation is the head's output at
the conversation's last real token:

- `encode_for_reward` renders prompt + response with the chat template and tokenizes it exactly
  as `encode_chat` does (no added special tokens; the template writes them), keeping the start
  when it is too long. The reward trainer and the scorer both use it, so a reward model sees the
  same text at sampling time as in training.
- `last_token_rewards` reads the head at the last position whose attention mask is 1, for left
  or right padding alike. transformers' own pooling looks for the last token that is not the pad
  id, which moves one token back when pad == EOS and a conversation ends in EOS; we take the
  head's per-token output instead (a forward hook: the call still goes through the wrapped
  model, so DDP and PEFT behave) and index it ourselves.
- `bradley_terry_loss`: -log sigmoid(r_chosen - r_rejected - margin) per pair (Bradley & Terry
  1952; InstructGPT; the margin is Llama 2's), plus center_coef * (r_chosen + r_rejected)^2, which
  keeps rewards centred on 0 (TRL's center_rewards_coefficient).
- `RewardModelScorer`: a trained reward model as a reward function for rs_sft and ppo.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.errors import RecipeError, UserError
from finetune.models.loading import (
    AdapterSetup,
    ModelInfo,
    _first_line,
    _new_token_layers,
    added_token_ids,
    check_modules_to_save,
    count_params,
    linear_layer_names,
    load_config,
    prepare_for_training,
    quantization_kwargs,
    quantization_of,
    resolve_target_modules,
    weight_dtype,
)
from finetune.models.precision import inference_dtype
from finetune.recipe.schema import Recipe


def encode_for_reward(tokenizer, messages: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a whole conversation (prompt + response), as encode_chat renders it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids[:max_length] if max_length else ids


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        input_ids[k, :len(row)] = torch.tensor(row)
        mask[k, :len(row)] = 1
    return input_ids, mask


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) index of the last 1 of each row: len-1 with right padding, time-1 with left."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def score_head(model: torch.nn.Module) -> torch.nn.Module:
    """The scalar head: transformers names it `score` (under PEFT, the wrapper that trains it)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "score":
            return module
    raise ValueError(f"{type(model).__name__} has no `score` head: not a *ForSequenceClassification model")


def last_token_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(rows,) fp32 rewards read at each row's last real token."""
    captured: list[torch.Tensor] = []
    hook = score_head(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    # Positions count real tokens from 0 whatever the padding side, as generate does.
    position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    finally:
        hook.remove()
    per_token = captured[-1][..., 0]  # (rows, time)
    index = last_token_index(attention_mask).to(per_token.device)
    return per_token.gather(1, index[:, None]).squeeze(1).float()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """(pairs,) -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss


# ---------------------------------------------------------------- scoring with a trained model


def check_reward_model_dir(path: str, key: str):
    """The tokenizer of a reward-model directory, after checking (without weights) that it is one."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(path)
    hint = "a reward model written by trainer.type: reward is <run.output_dir>/final"
    if not p.is_dir():
        raise RecipeError(f"{key}: {path!r} is not a directory ({hint})")
    adapter = p / "adapter_config.json"
    try:
        if adapter.is_file():
            task = json.loads(adapter.read_text()).get("task_type")
            if task != "SEQ_CLS":
                raise RecipeError(f"{key}: {path!r} is a {task} adapter, not a reward model ({hint})")
        else:
            config = AutoConfig.from_pretrained(p)
            archs = config.architectures or []
            if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
                raise RecipeError(f"{key}: {path!r} is not a reward model: its config has architectures "
                                  f"{archs} and {config.num_labels} labels, not one scalar head ({hint})")
        tokenizer = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as e:
        raise RecipeError(f"{key}: cannot read {path!r}: {str(e).strip().splitlines()[0]}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError(f"{key}: the reward model {path!r} has no chat template saved with its tokenizer")
    if not adapter.is_file():
        rows = config.get_text_config().vocab_size
        if rows and len(tokenizer) > rows:
            raise RecipeError(f"{key}: the tokenizer in {path!r} has {len(tokenizer)} tokens but the model's "
                              f"embeddings have {rows} rows: tokenizer and weights do not belong together")
    return tokenizer


class RewardModelScorer:
    """A reward function backed by a trained reward model (weights loaded at first use)."""

    def __init__(self, path: str, key: str, max_length: int = 2048, batch_size: int = 64) -> None:
        self.path, self.key = path, key
        self.tokenizer = check_reward_model_dir(path, key)
        self.max_length, self.batch_size = max_length, batch_size
        self.model = None

    def check_template(self, tokenizer, key: str) -> None:
        """The reward model was trained on conversations rendered with its template; one rendered
        differently by the policy's template is a different input distribution."""
        if tokenizer.chat_template != self.tokenizer.chat_template:
            raise RecipeError(f"{key}.path: the reward model {self.path!r} was trained with a different chat "
                              "template than this run's (tokenizer.chat_template); train the reward model "
                              "from the same base with the same template")

    def _load(self):
        if self.model is None:
            from accelerate import PartialState

            # cpu=True without CUDA, as the engine's Accelerator: else a CPU process group is ignored.
            self.model = load_trained_reward_model(self.path, PartialState(cpu=not torch.cuda.is_available()).device)
        return self.model

    @torch.no_grad()
    def __call__(self, prompts, completions, **_columns) -> list[float]:
        model = self._load()
        rows = [encode_for_reward(self.tokenizer, p + [{"role": "assistant", "content": c}], self.max_length)
                for p, c in zip(prompts, completions, strict=True)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            input_ids, mask = pad_right(rows[start:start + self.batch_size], pad)
            device = next(model.parameters()).device
            scores += last_token_rewards(model, input_ids.to(device), mask.to(device)).tolist()
        return scores


# Loading: a causal LM with a scalar head (trainer.type reward), and a trained one for scoring.


def load_reward_model(recipe: Recipe, tokenizer=None) -> tuple[torch.nn.Module, ModelInfo]:
    """model.name (a causal LM, or a reward model to continue) with a one-output scalar head.

    transformers' *ForSequenceClassification(num_labels=1) puts a new linear `score` head on the
    checkpoint's backbone (its lm_head goes unused). With an adapter, LoRA uses peft's SEQ_CLS
    task: the head trains in full and is saved with the adapter (modules_to_save), so
    AutoPeftModelForSequenceClassification.from_pretrained(final) loads the reward model.
    """
    from transformers import AutoModelForSequenceClassification

    m = recipe.model
    if m.name is None:
        raise RecipeError("model.name: a reward model starts from a pretrained causal LM "
                          "(model.init_config is not supported by trainer.type reward)")
    dtype = weight_dtype(recipe)
    kwargs = {"dtype": dtype, "num_labels": 1}
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    if m.quantize is not None:
        kwargs.update(quantization_kwargs(recipe))
    register_score_head(load_config(recipe))
    try:
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            m.name, revision=m.revision, trust_remote_code=m.trust_remote_code, use_safetensors=True,
            output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name: cannot load {m.name!r} with a scalar head: {_first_line(e)}") from None
    notes: list[str] = []
    if any(k.split(".")[-2:] == ["score", "weight"] for k in loading.get("missing_keys", ())):
        init_score_head(model)
    prepare_for_training(model, recipe, tokenizer, notes)
    if recipe.adapter is not None:
        model = _add_reward_adapter(model, recipe)
    total, trainable = count_params(model)
    return model, ModelInfo(total, trainable, str(dtype).removeprefix("torch."), f"{m.name} + scalar head", notes)


def register_score_head(config) -> None:
    """Families transformers gives no *ForSequenceClassification (Granite, Cohere, ...): register
    its GenericForSequenceClassification (backbone under `model` + linear `score`, as for Llama)
    on the family's pretrained base, so AutoModelForSequenceClassification loads them."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.modeling_layers import GenericForSequenceClassification

    kind = type(config)
    if kind in AutoModelForSequenceClassification._model_mapping or kind not in AutoModel._model_mapping:
        return
    backbone = AutoModel._model_mapping[kind]
    pretrained = backbone.__mro__[1]  # e.g. GranitePreTrainedModel
    if getattr(pretrained, "base_model_prefix", "model") != "model":
        return  # the backbone is stored under another name: keys would not match
    name = backbone.__name__.removesuffix("Model") + "ForSequenceClassification"
    head = type(name, (GenericForSequenceClassification, pretrained), {})
    AutoModelForSequenceClassification.register(kind, head, exist_ok=True)


def init_score_head(model: torch.nn.Module) -> None:
    """A new scalar head drawn from N(0, 1/sqrt(d_model + 1)), bias 0, as OpenAI's
    lm-human-preferences and the N+ implementation details do, so the head's output starts at unit
    scale on the normalised final hidden state whatever the width (transformers' default std 0.02
    does not scale with it). On the quickstart task it made no measurable difference (the loss
    leaves ln 2 after ~200 steps either way); it is there to match the reference recipe."""
    head = score_head(model)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
        if head.bias is not None:
            head.bias.zero_()


def _add_reward_adapter(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    a = recipe.adapter
    targets = [t for t in resolve_target_modules(model, a.target_modules) if t != "score"]
    check_modules_to_save(model, a.modules_to_save)
    new_ids = added_token_ids(model, recipe)
    token_layers, how = _new_token_layers(model, new_ids, a.modules_to_save)
    quantized = quantization_of(model)
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, target_modules=a.target_modules,
        modules_to_save=a.modules_to_save, use_dora=a.use_dora, use_rslora=a.use_rslora,
        trainable_token_indices={name: new_ids for name in token_layers} or None,
        task_type="SEQ_CLS",  # peft then trains and saves the `score` head in full
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise RecipeError(f"adapter: {_first_line(e)}; the model's linear layers are: "
                          f"{', '.join(linear_layer_names(model))}") from None
    peft_model.adapter_setup = AdapterSetup(targets, new_ids, how, token_layers if how else [], quantized)
    return peft_model


def load_trained_reward_model(path: str | Path, device=None) -> torch.nn.Module:
    """A reward model written by trainer.type reward (full weights or a SEQ_CLS adapter), in eval
    mode: the GPU's native 16-bit dtype (bf16, fp16 before Ampere), fp32 on the CPU."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    dtype = inference_dtype(device)
    path = Path(path)
    adapter_config = path / "adapter_config.json"
    config_of = json.loads(adapter_config.read_text())["base_model_name_or_path"] if adapter_config.is_file() else path
    register_score_head(AutoConfig.from_pretrained(config_of))
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, use_safetensors=True)
    if model.config.pad_token_id is None:  # batches of several rows need it (transformers' pooling)
        model.config.pad_token_id = AutoTokenizer.from_pretrained(path).pad_token_id
    return model.to(device or "cpu").eval()
