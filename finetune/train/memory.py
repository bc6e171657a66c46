"""Predicted peak GPU memory per process, from the recipe and the model's config (no weights, no GPU).

Printed by every run's plan and by ``finetune run --dry-run``. Parts:

- weights, gradients, optimizer state: exact arithmetic over the architecture's parameter shapes
  (llama-family decoders: llama, qwen2, mistral, ...) for the dtypes ``models.loading`` chooses:
  fp32 master weights for full fine-tuning, a bf16 (or 4/8-bit) frozen base under fp32 LoRA
  weights; AdamW keeps two states in the parameter's dtype, AdamW8bit two bytes per parameter.
  tests/test_memory.py checks them byte for byte against real tensors.
- activations: bytes saved for backward per token and layer, coefficients measured on the CPU
  under bf16 autocast with saved-tensor hooks (tests/test_memory.py re-measures them); with
  gradient checkpointing only each layer's input is kept, plus one layer recomputed in backward.
- logits/loss: the plain loss keeps (tokens x vocab) logits in bf16, fp32 and its log-softmax and
  gradient (~12 bytes per logit at the peak); the chunked cross-entropy (finetune.train.fastpath)
  holds one chunk of 2048 positions in fp32 plus an fp32 gradient of the output head when it trains.
- strategy: ZeRO-2 shards gradients and optimizer state over the processes, FSDP / ZeRO-3 the
  weights too (plus two gathered layers); DDP adds gradient buckets as large as the gradients.
- ppo: the reward model (assumed the policy's shape), a full reference or separate critic, and
  sampling's KV cache where it outgrows training's activations and logits.

The GPU check (``make gpu-check``) compares the total with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

GB = 1e9
CHUNK = 2048  # fastpath.CHUNK_SIZE (not imported: this module must stay importable without torch)
LOGIT_BYTES = 12  # plain CE at its peak: saved fp32 log-softmax + its gradient in and out
# chunked CE: fp32 logits, logits - lse and the softmax gradient of one chunk (12 bytes per logit); from
# the second chunk on, the previous chunk's logits and gradients live until the new ones replace them (16).
CHUNK_LOGIT_BYTES, CHUNKS_LOGIT_BYTES = 12, 16

# Activation bytes saved per token and decoder layer under bf16 autocast, as coefficients of
# (hidden, intermediate, q width, kv width); measured with saved_tensors_hooks (see module doc).
ACT_BF16_BASE = (16.0, 8.0, 4.25, 4.0)   # bf16 weights: residual stream in bf16
ACT_FP32_BASE = (30.5, 9.5, 5.25, 5.0)   # fp32 master weights / QLoRA's fp32 norms: fp32 residual
LORA_EXTRA = (2.5, 0.2, 2.0, 0.0)        # LoRA without dropout (+ 2 bytes x r per targeted linear)
LORA_DROPOUT_EXTRA = (20.0, 4.0, 4.0, 0.0)  # dropout masks and dropped copies of each input

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """The dimensions of a llama-family decoder that memory depends on."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool
    qkv_bias: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config) -> Shape:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        qkv_bias = bool(getattr(c, "attention_bias", False)) or c.model_type == "qwen2"
        return cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, heads,
                   getattr(c, "num_key_value_heads", None) or heads, head_dim, c.intermediate_size,
                   bool(getattr(config, "tie_word_embeddings", True)), qkv_bias, c.model_type)

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per layer: name -> (in features, out features, has bias)."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        b = self.qkv_bias
        return {"q_proj": (h, q, b), "k_proj": (h, kv, b), "v_proj": (h, kv, b), "o_proj": (q, h, False),
                "gate_proj": (h, i, False), "up_proj": (h, i, False), "down_proj": (i, h, False)}

    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o, _ in self.linears().values())

    def bias_params(self) -> int:
        return self.layers * sum(o for _, o, b in self.linears().values() if b)

    def other_params(self) -> int:
        """Embeddings, the untied head and the norms (never quantized)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.bias_params() + self.other_params()

    def per_token_layer(self, coef: tuple[float, float, float, float]) -> float:
        return (coef[0] * self.hidden + coef[1] * self.intermediate + coef[2] * self.heads * self.head_dim
                + coef[3] * self.kv_heads * self.head_dim)


@dataclass
class MemoryEstimate:
    """Bytes per process; *_alt: the other choice of checkpointing / chunked CE, for the plan line."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    extra: float = 0.0  # PPO: reward model / generation; DDP buckets; FSDP gathered layers
    checkpointing: bool = False
    chunked_ce: bool = False
    accumulating: bool = False  # gradients held while the next micro-batch's activations build up
    recompute: float = 0.0  # checkpointing: the one layer recomputed in backward, after the loss's transient is gone
    activations_alt: float = 0.0
    logits_alt: float = 0.0
    assumption: str = ""

    @property
    def total(self) -> float:
        # Gradients are set to None after each step: without accumulation they grow in backward
        # while the activations and the loss's transient are freed, so only the larger of the two counts.
        transient = self.activations + self.logits - min(self.recompute, self.logits)
        live = self.gradients + transient if self.accumulating else max(self.gradients, transient)
        return self.weights + self.optimizer + self.extra + live

    def lines(self) -> list[str]:
        ck = "on" if self.checkpointing else "off"
        ce = "chunked" if self.chunked_ce else "plain"
        alt_ck, alt_ce = ("off" if self.checkpointing else "on"), ("plain" if self.chunked_ce else "chunked")
        other = f", other {_size(self.extra)}" if self.extra else ""
        return [f"memory     ~{_size(self.total)} peak per GPU{self.assumption}: weights {_size(self.weights)}, "
                f"grads {_size(self.gradients)}, optimizer {_size(self.optimizer)}{other}",
                f"memory     activations {_size(self.activations)} (checkpointing {ck}; {alt_ck}: "
                f"{_size(self.activations_alt)}), logits/loss {_size(self.logits)} ({ce} CE; {alt_ce}: "
                f"{_size(self.logits_alt)})"]


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def _lora_targets(shape: Shape, target) -> list[str]:
    if target == "all-linear":
        return list(LINEARS)
    if isinstance(target, str):  # peft: a regular expression over full module names
        names = {n: f"model.layers.0.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}" for n in LINEARS}
        return [n for n, full in names.items() if re.fullmatch(target, full)]
    return [n for n in LINEARS if n in target]


def lora_params(shape: Shape, adapter) -> int:
    """A (r x in) + B (out x r) per targeted linear and layer; DoRA adds a magnitude per output."""
    lin = shape.linears()
    per_layer = sum(adapter.r * (lin[n][0] + lin[n][1]) + (lin[n][1] if adapter.use_dora else 0)
                    for n in _lora_targets(shape, adapter.target_modules))
    return shape.layers * per_layer


def _base_weight_bytes(shape: Shape, recipe, base_bytes: int) -> float:
    q = recipe.model.quantize
    if q is None:
        return shape.params() * base_bytes
    # prepare_model_for_kbit_training casts every non-quantized bf16/fp16 parameter to fp32.
    rest = (shape.other_params() + shape.bias_params()) * 4
    n = shape.linear_params()
    if q == "4bit":  # NF4: half a byte, absmax per 64 as uint8 (double quant) + fp32 per 256 blocks
        return rest + n * (0.5 + 1 / 64 + 4 / (64 * 256))
    rows = shape.layers * sum(o for _, o, _ in shape.linears().values())
    return rest + n + rows * 4  # int8 + an fp32 scale per output row


def weight_bytes_per_param(recipe, cuda_bf16: bool = True) -> int:
    """models.loading.weight_dtype, for a GPU (cuda_bf16) or this CPU."""
    explicit = {"bfloat16": 2, "float16": 2, "float32": 4}.get(recipe.model.dtype)
    if explicit:
        return explicit
    return 2 if recipe.adapter is not None and cuda_bf16 else 4


def chunked_ce_on(recipe, cuda: bool = True) -> bool:
    """fastpath.use_chunked_ce as it will decide on a GPU; only the sft trainer has the fused loss."""
    if recipe.trainer.type != "sft":
        return False
    mode = getattr(recipe.run, "chunked_ce", False)
    if mode is True:
        return True
    return mode == "auto" and cuda and recipe.launch.strategy not in ("fsdp", "zero3")


def sequence_tokens(recipe) -> tuple[int, int]:
    """(tokens in one micro-batch at most, positions whose logits are computed)."""
    run, t = recipe.run, recipe.tokenizer
    if recipe.trainer.type == "ppo":
        new = recipe.trainer.sampling.max_new_tokens
        return run.micro_batch_size * (t.max_length + new), run.micro_batch_size * new
    if recipe.trainer.type == "reward":  # chosen and rejected side by side, one score per row
        return 2 * run.micro_batch_size * t.max_length, 0
    tokens = run.micro_batch_size * t.max_length
    return tokens, tokens


def estimate(recipe, shape: Shape, world: int = 1, cuda_bf16: bool = True) -> MemoryEstimate:
    """Peak GPU memory of one process training `recipe` on `shape` with `world` processes."""
    base_b = weight_bytes_per_param(recipe, cuda_bf16)
    adapter = recipe.adapter
    if adapter is None:
        trainable, train_b = shape.params(), base_b
        weights = shape.params() * base_b
    else:
        trainable, train_b = lora_params(shape, adapter), 4  # peft keeps adapter weights in fp32
        weights = _base_weight_bytes(shape, recipe, base_b) + trainable * 4
    grads = trainable * train_b
    optim = trainable * (2 if recipe.optim.name == "adamw_8bit" else 2 * train_b)

    # Activations: residual stream in fp32 when the weights or (QLoRA) the norms are fp32.
    fp32_residual = (adapter is None and base_b == 4) or recipe.model.quantize is not None
    coef = list(ACT_FP32_BASE if fp32_residual else ACT_BF16_BASE)
    per_layer_extra = 0.0
    if adapter is not None:
        coef = [a + b for a, b in zip(coef, LORA_EXTRA, strict=True)]
        if adapter.dropout > 0:
            coef = [a + b for a, b in zip(coef, LORA_DROPOUT_EXTRA, strict=True)]
        per_layer_extra = 2 * adapter.r * len(_lora_targets(shape, adapter.target_modules))  # bf16 A outputs
    layer = shape.per_token_layer(tuple(coef)) + per_layer_extra
    tokens, logit_positions = sequence_tokens(recipe)
    residual = 4 if fp32_residual else 2
    outside = 8 * shape.hidden * tokens  # embeddings' output, final norm, hidden-state gradient
    full = shape.layers * layer * tokens + outside
    # Checkpointing keeps each layer's input; backward recomputes one layer at a time.
    ckpt = shape.layers * residual * shape.hidden * tokens + layer * tokens + outside
    checkpointing = recipe.model.gradient_checkpointing or recipe.model.quantize is not None

    chunked = chunked_ce_on(recipe)
    head_grad = 4 * shape.vocab * shape.hidden if adapter is None else 0  # fp32 dW summed over chunks
    plain = LOGIT_BYTES * shape.vocab * logit_positions
    per_logit = CHUNK_LOGIT_BYTES if logit_positions <= CHUNK else CHUNKS_LOGIT_BYTES
    fused = per_logit * shape.vocab * min(CHUNK, logit_positions) + (head_grad if logit_positions else 0)

    extra, strategy = 0.0, recipe.launch.strategy
    if world > 1 and strategy == "ddp":
        extra += grads  # DDP's gradient buckets are a second copy of the gradients
    if strategy in ("zero2", "zero3", "fsdp") and world > 1:
        grads, optim = grads / world, optim / world
        if strategy != "zero2":
            layer_params = (shape.params() - shape.other_params()) / shape.layers
            weights = weights / world
            extra += 2 * layer_params * min(base_b, 2)  # the gathered current and prefetched layer
    if recipe.trainer.type == "ppo":
        extra += _ppo_extra(recipe, shape, base_b)
        # Sampling holds a KV cache instead of training's activations and logits: count what exceeds them.
        kv = _kv_cache(recipe, shape)
        extra += max(0.0, kv - (ckpt if checkpointing else full) - (fused if chunked else plain))
    assumption = "" if cuda_bf16 else " (this machine's dtypes)"
    accumulating = recipe.run.grad_accum > 1 or recipe.trainer.type == "ppo"  # ppo: micro-batches per minibatch
    return MemoryEstimate(weights, grads, optim, ckpt if checkpointing else full, fused if chunked else plain, extra,
                          checkpointing, chunked, accumulating, layer * tokens if checkpointing else 0.0,
                          full if checkpointing else ckpt, plain if chunked else fused, assumption)


def _kv_cache(recipe, shape: Shape) -> float:
    """bf16 keys and values of one sampling batch at full length, plus fp32 logits of one step."""
    s = recipe.trainer.sampling
    length = recipe.tokenizer.max_length + s.max_new_tokens
    rows = s.batch_size  # sequences per generate call, the n copies included
    return (rows * length * 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
            + rows * shape.vocab * 4 * 2)


def _ppo_extra(recipe, shape: Shape, base_b: int) -> float:
    """The reward model (assumed the policy's shape, bf16), a full reference when there is no adapter,
    and a separate critic's weights, gradients and optimizer state."""
    ppo = recipe.trainer.ppo
    extra = shape.params() * 2.0 if any(r.type == "model" for r in recipe.trainer.rewards) else 0.0
    if recipe.adapter is None:
        extra += shape.params() * 2.0  # frozen reference copy
    if ppo.critic == "separate":
        critic_trainable = shape.params() if recipe.adapter is None else lora_params(shape, recipe.adapter)
        extra += shape.params() * (base_b if recipe.adapter is None else 2) + critic_trainable * 4 * 3
    elif recipe.adapter is not None:
        extra += lora_params(shape, recipe.adapter) * 4 * 4  # the critic adapter: weights, grads, 2 states
    return extra


def _resized(shape: Shape, base_params: int) -> Shape:
    """The shape whose vocabulary makes its parameter count base_params (added tokens), if one does."""
    rows, rest = divmod(base_params - (shape.params() - shape.vocab * shape.hidden * (1 if shape.tied else 2)),
                        shape.hidden * (1 if shape.tied else 2))
    return replace(shape, vocab=rows) if rows > 0 and rest == 0 else shape


def world_of(recipe, num_processes: int) -> int:
    """Processes the run shards over: the running world, or the recipe's launch section in a dry run."""
    if num_processes > 1:
        return num_processes
    return recipe.launch.num_processes * recipe.launch.nnodes


def plan_lines(recipe, num_processes: int = 1, total_params: int | None = None) -> list[str]:
    """The plan's memory line; a note instead when the config cannot be read or is not a llama-family decoder.

    total_params (the plan's count) fixes the vocabulary when the tokenizer resized the embeddings.
    """
    import torch

    from finetune.models.loading import load_config
    from finetune.models.precision import native_bf16

    try:
        config = load_config(recipe)
        shape = Shape.from_config(config)
        if total_params:
            shape = _resized(shape, total_params - (lora_params(shape, recipe.adapter) if recipe.adapter else 0))
    except Exception as e:  # noqa: BLE001 - the plan must print even when the estimate cannot
        return [f"memory     (no estimate: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    cuda = torch.cuda.is_available()
    cuda_bf16 = not cuda or native_bf16()
    est = estimate(recipe, shape, world_of(recipe, num_processes), cuda_bf16=cuda_bf16)
    if not cuda:
        est.assumption = " on a bf16 GPU"
    return est.lines()
