"""The typed recipe: schema, YAML loading with line numbers, dotted overrides, validation.

A recipe is YAML with the fixed top-level sections of DESIGN.md (model, tokenizer, data, adapter,
trainer, optim, run, launch). Every error names the file, the line and the dotted key, with a
"did you mean" for misspelt keys, and is raised as ``RecipeError`` (exit code 2 in the CLI).

This module must not import torch: ``finetune validate`` runs in a second without it.
Relative paths in a recipe (data, templates, local models, output_dir) are relative to the
current working directory, as with every peer tool, so a resolved recipe reruns as is.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune.errors import RecipeError
from finetune.recipe.peers import peer_kind, suggestion

TRAINER_TYPES = ("pretrain", "sft", "reward", "rs_sft", "ppo", "dpo", "distill")
# accelerate's trackers (accelerate.tracking.LOGGER_TYPE_TO_CLASS) -> the module each needs installed.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
            "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}
DATA_FORMATS = ("text", "messages", "prompt_completion", "sharegpt", "alpaca", "preference", "prompts")
# `auto` (the default) reads the format from the columns of a source's first rows (finetune.data.sources).


class PeerConfigError(RecipeError):
    """The file is an Axolotl / TRL config, not a recipe (`finetune validate` prints the translation)."""

    def __init__(self, path: Path, kind: str, data: dict) -> None:
        super().__init__(f"{path}: this is an {kind} config, not a finetune recipe; "
                         f"`finetune validate {path}` prints the equivalent recipe")
        self.path, self.kind, self.data = path, kind, data


class Section(BaseModel):
    # Unknown keys are errors (typos must not be silently ignored); values are validated on
    # assignment too, so overrides applied later are checked the same way.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelCfg(Section):
    name: str | None = None
    init_config: dict[str, Any] | str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    quantize: Literal["4bit", "8bit"] | None = None
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    allow_bin: bool = False  # load pickle .bin weights (torch.load with weights_only=True) when no safetensors
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelCfg:
        if (self.name is None) == (self.init_config is None):
            raise ValueError("set exactly one of model.name (Hub id or local dir) or model.init_config")
        return self


class TokenizerTrainCfg(Section):
    vocab_size: int = Field(1024, gt=0)


class TokenizerCfg(Section):
    name: str | None = None
    chat_template: str = "auto"
    max_length: int = Field(2048, gt=0)
    overflow: Literal["truncate", "drop"] = "truncate"
    train: TokenizerTrainCfg | None = None


class DataSource(Section):
    path: str
    format: Literal[("auto", *DATA_FORMATS)] = "auto"  # type: ignore[valid-type]
    columns: dict[str, str] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0)
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    max_samples: int | None = Field(None, gt=0)
    encoding: str = "utf-8"  # of local jsonl / json / txt files
    streaming: bool = False  # Hub datasets: read as a stream (max_samples: the first N rows)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError("unknown encoding (e.g. utf-8, latin-1, cp1252, utf-16)") from None
        return value


class DataCfg(Section):
    train: list[DataSource] = Field(min_length=1)
    eval: list[DataSource] | None = None
    eval_fraction: float | None = Field(None, gt=0, lt=1)
    packing: bool = False
    padding_free: bool = True
    cache: bool = True  # tokenized samples cached under $FINETUNE_CACHE (~/.cache/finetune)
    num_proc: int | None = Field(None, ge=1)  # tokenizing processes (None: min(8, CPUs))
    packing_buffer: int = Field(100_000, ge=1)  # samples bin-packed together (bounds the packer)
    on_bad_row: Literal["error", "skip"] = "error"
    max_bad_rows: int = Field(100, ge=0)
    shuffle: bool = True


class AdapterCfg(Section):
    type: Literal["lora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False


class SamplingCfg(Section):
    """Rollouts for rs_sft, ppo and eval: plain temperature sampling unless told otherwise."""

    n: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(64, gt=0)


class RewardCfg(Section):
    """One reward component; several are summed with their weights (finetune.rl.rewards)."""

    type: Literal["exact_match", "numeric", "regex", "length", "model", "function"]
    weight: float = 1.0
    column: str = "answer"           # exact_match / numeric: the reference column of the prompt row
    pattern: str | None = None       # regex: reward 1 when the completion matches
    min_length: int | None = Field(None, ge=0)  # length: reward 1 inside [min_length, max_length] chars
    max_length: int | None = Field(None, ge=0)
    path: str | None = None          # model: a reward-model directory (trainer.type reward output)
    function: str | None = None      # function: "package.module:callable"

    @model_validator(mode="after")
    def _needs(self) -> RewardCfg:
        # Each type's own key must be there: a regex reward without a pattern would score nothing.
        need = {"regex": "pattern", "model": "path", "function": "function"}.get(self.type)
        if need and getattr(self, need) is None:
            raise ValueError(f"a {self.type} reward needs `{need}`")
        if self.type == "regex":
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {e}") from None
        if self.type == "length":
            if self.min_length is None and self.max_length is None:
                raise ValueError("a length reward needs min_length and/or max_length")
            if None not in (self.min_length, self.max_length) and self.min_length > self.max_length:
                raise ValueError(f"min_length {self.min_length} > max_length {self.max_length}")
        if self.type == "function" and not re.fullmatch(r"[\w.]+:[\w.]+", self.function):
            raise ValueError(f"function {self.function!r} must be an import path 'package.module:callable'")
        return self


class RewardModelCfg(Section):
    """reward trainer: pairwise Bradley-Terry loss options."""

    use_margin: bool = False         # subtract the row's `margin` column inside the sigmoid
    center_coef: float = Field(0.0, ge=0)  # penalty on (r_chosen + r_rejected)^2, keeps rewards centred


class RejectionCfg(Section):
    """rs_sft: rounds of sample -> score -> select -> SFT."""

    rounds: int = Field(2, ge=1)
    select: Literal["best_of_n", "top_k", "threshold", "all_correct"] = "best_of_n"
    k: int = Field(1, ge=1)          # top_k: keep the k best per prompt
    threshold: float = 1.0           # threshold / all_correct: minimum reward kept
    max_per_prompt: int = Field(1, ge=1)
    dedupe: Literal["exact", "whitespace", "none"] = "whitespace"
    keep: Literal["accumulate", "latest"] = "accumulate"
    restart: Literal["previous", "base"] = "previous"
    sft_data: list[DataSource] | None = None  # optionally mixed into every round's SFT set
    min_reward: float | None = None  # best_of_n / top_k: also require reward >= min_reward (null: any)
    # Held-out pass@1 / pass@n: scored with these (null: trainer.rewards); a completion passes
    # when its score >= pass_threshold (1 = a 0/1 verifier's "correct").
    eval_rewards: list[RewardCfg] | None = None
    pass_threshold: float = 1.0


class PPOCfg(Section):
    """ppo: sample -> score -> GAE -> epochs x minibatches of clipped updates (finetune.trainers.ppo).
    Defaults follow "The N+ Implementation Details of RLHF with PPO" (Huang et al., 2024)."""

    rollout_batch_size: int = Field(64, gt=0)    # sequences sampled per update, all processes together
    epochs: int = Field(4, gt=0)                 # K passes over each rollout batch
    minibatches: int = Field(4, gt=0)            # M optimizer steps per pass (run.micro_batch_size: accumulation)
    clip: float = Field(0.2, gt=0)               # epsilon of the clipped ratio
    value_clip: float = Field(0.2, gt=0)         # epsilon_v: how far a value may move from the rollout's
    value_coef: float = Field(0.1, ge=0)         # c_v: loss = policy + c_v * value - entropy_coef * entropy
    entropy_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    kl_coef: float = Field(0.05, ge=0)           # beta (the starting beta when kl_target is set)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = Field(None, gt=0)  # adaptive beta toward this KL per sequence (Ziegler et al.)
    kl_horizon: int = Field(10000, gt=0)
    whiten_advantages: bool = True
    score_norm: bool = False                     # whiten the scores over each rollout batch (all processes)
    score_clip: float | None = Field(None, gt=0)  # clip scores to [-score_clip, score_clip]
    missing_eos_penalty: float | None = 1.0       # subtracted from the score of a response that never stopped
    critic: Literal["separate", "adapter"] = "separate"
    critic_from: Literal["auto", "reward_model", "policy"] = "auto"  # separate critic's start (auto: RM if any)
    critic_warmup_updates: int = Field(0, ge=0)  # the policy is frozen for the first N updates
    critic_lr: float | None = Field(None, gt=0)  # the critic's learning rate (null: optim.lr)
    sample_every: int = Field(10, gt=0)          # completions to samples.jsonl every N updates
    samples_logged: int = Field(4, ge=0)
    eval_temperature: float = Field(0.0, ge=0)   # held-out score (run.eval_every): 0 = greedy
    eval_prompts: int = Field(100, ge=0)         # at most this many held-out prompts (0: all)
    eval_rewards: list[RewardCfg] | None = None  # the held-out score's rewards (null: trainer.rewards)
    # gae: critic + GAE. grpo / rloo: no critic, one advantage per completion from its prompt's
    # sampling.n samples. kl_in auto: loss (k3) for grpo, reward otherwise. loss_norm: over the
    # minibatch's tokens, per completion then over completions (GRPO), tokens / (rows x max_new_tokens) (Dr. GRPO)
    advantage: Literal["gae", "grpo", "rloo"] = "gae"
    grpo_std: bool = True                        # false: Dr. GRPO (no division by the group's std)
    kl_in: Literal["auto", "reward", "loss"] = "auto"
    loss_norm: Literal["token_mean", "seq_mean", "constant"] = "token_mean"

    @model_validator(mode="after")
    def _minibatches_divide(self) -> PPOCfg:
        # The rest of the layout (processes, micro-batches) is checked when the run starts.
        if self.rollout_batch_size % self.minibatches:
            raise ValueError(f"rollout_batch_size {self.rollout_batch_size} does not split into "
                             f"{self.minibatches} minibatches")
        return self

    @property
    def has_critic(self) -> bool:
        return self.advantage == "gae"

    @property
    def kl_term(self) -> str:  # where the KL to the reference goes: 'reward' or 'loss'
        return self.kl_in if self.kl_in != "auto" else ("loss" if self.advantage == "grpo" else "reward")


class DPOCfg(Section):
    """dpo: preference optimisation on pairs, no reward model (finetune.trainers.dpo)."""

    loss: Literal["sigmoid", "robust", "ipo", "simpo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # flip rate: cDPO (sigmoid, simpo), rDPO (robust)
    gamma: float = 0.5                                  # simpo: the target reward margin
    sft_weight: float = Field(0.0, ge=0)  # + weight x the chosen reply's NLL per token (RPO, Pang et al. 2024)
    precompute_ref: bool | None = None  # null: precomputed for full weights, adapter disabled under LoRA

    @model_validator(mode="after")
    def _smoothing_applies(self) -> DPOCfg:
        if self.label_smoothing and self.loss == "ipo":
            raise ValueError("label_smoothing applies to the sigmoid, robust and simpo losses, not ipo")
        return self


class DistillCfg(Section):
    """distill: a teacher's next-token distributions on the student's trained tokens (finetune.trainers.distill)."""

    teacher: str | None = None  # model dir or Hub id sharing the student's tokenizer (required by distill)
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1)   # jsd: teacher weight in the mixture; 0 = forward_kl, 1 = reverse_kl
    temperature: float = Field(1.0, gt=0)  # both distributions at logits / temperature
    top_k: int | None = Field(None, gt=0)  # the teacher's k likeliest tokens + one bucket for the rest
    sft_weight: float = Field(0.0, ge=0)   # + weight x NLL of the data's tokens (off-policy batches)
    on_policy_fraction: float = Field(0.0, ge=0, le=1)  # GKD's lambda: batches replied by the student's samples


class TrainerCfg(Section):
    type: Literal[TRAINER_TYPES]  # type: ignore[valid-type]
    train_on: Literal["assistant", "last_assistant", "completion", "all"] = "assistant"
    # sft: greedy exact-match of the last assistant turn on this many eval conversations (0: off)
    exact_match_samples: int = Field(100, ge=0)
    max_new_tokens: int = Field(64, gt=0)
    sampling: SamplingCfg = Field(default_factory=SamplingCfg)
    rewards: list[RewardCfg] = Field(default_factory=list)
    reward_model: RewardModelCfg = Field(default_factory=RewardModelCfg)
    rejection: RejectionCfg = Field(default_factory=RejectionCfg)
    ppo: PPOCfg = Field(default_factory=PPOCfg)
    dpo: DPOCfg = Field(default_factory=DPOCfg)
    distill: DistillCfg = Field(default_factory=DistillCfg)


class OptimCfg(Section):
    name: Literal["adamw", "adamw_8bit"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    scheduler: str = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float | None = Field(1.0, gt=0)


class RunCfg(Section):
    output_dir: str
    max_steps: int | None = Field(None, gt=0)
    epochs: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0)
    eval_batches: int | None = Field(None, gt=0)
    eval_at_start: bool = False
    save_every: int | None = Field(None, gt=0)
    keep_last: int = Field(2, gt=0)
    resume: str = "auto"
    max_skipped_steps: int = Field(5, ge=0)  # consecutive non-finite steps skipped before stopping
    overwrite: bool = False
    report_to: list[Literal[tuple(TRACKERS)]] = Field(default_factory=list)  # type: ignore[valid-type]
    sample_prompts: list[str] = Field(default_factory=list)
    sample_max_new_tokens: int = Field(32, gt=0)
    # Fast path (finetune.train.fastpath; docs/benchmarks.md): torch.compile of each decoder layer, and
    # the fused linear cross-entropy that never makes full fp32 logits (auto: on with CUDA when
    # the output head is a plain Linear and the run is not FSDP/ZeRO-3). Opt-in until measured on GPU.
    compile: bool = False
    chunked_ce: bool | Literal["auto"] = False


class LaunchCfg(Section):
    """`finetune launch`: processes per node, nodes and the distribution strategy."""

    num_processes: int = Field(1, gt=0)   # per node (GPUs per node; CPU processes without GPUs)
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = "ddp"
    nnodes: int = Field(1, gt=0)
    node_rank: int = Field(0, ge=0)
    master: str | None = None             # "host:port" of node 0; required when nnodes > 1
    # Unused since the engine applies FSDP2 itself (checkpoints sharded, final/ consolidated); still
    # accepted so recipes and saved recipe.yaml files that name it load (check_recipe notes "sharded").
    fsdp_state_dict: Literal["full", "sharded"] = "full"


class Recipe(Section):
    model: ModelCfg
    tokenizer: TokenizerCfg = Field(default_factory=TokenizerCfg)
    data: DataCfg
    adapter: AdapterCfg | None = None
    trainer: TrainerCfg
    optim: OptimCfg = Field(default_factory=OptimCfg)
    run: RunCfg
    launch: LaunchCfg = Field(default_factory=LaunchCfg)

    # Where the recipe came from: used in messages only, never written back.
    _source: str = "<recipe>"


# ----------------------------------------------------------------------------------------------
# Loading


class _Lines:
    """Maps dotted key paths to 'file:line' (or the override that set them) for messages."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.where: dict[tuple, str] = {}

    def of(self, loc: tuple) -> str:
        # The closest located ancestor: a missing key is reported at its parent mapping.
        for n in range(len(loc), -1, -1):
            if tuple(loc[:n]) in self.where:
                return self.where[tuple(loc[:n])]
        return self.source


def _record_lines(node: yaml.Node, path: tuple, lines: _Lines) -> None:
    lines.where[path] = f"{lines.source}:{node.start_mark.line + 1}"
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            lines.where[path + (key.value,)] = f"{lines.source}:{key.start_mark.line + 1}"
            _record_lines(value, path + (key.value,), lines)
            lines.where[path + (key.value,)] = f"{lines.source}:{key.start_mark.line + 1}"
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, path + (i,), lines)


def _parse_yaml(text: str, source: str) -> tuple[dict, _Lines]:
    lines = _Lines(source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        raise RecipeError(f"{source}: the recipe is empty")
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a mapping of sections (model, data, trainer, run ...)")
    _record_lines(node, (), lines)
    return data, lines


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Reads a recipe file, applies `key=value` overrides and validates the result."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from None
    data, lines = _parse_yaml(text, str(path))
    kind = peer_kind(data)
    if kind:
        raise PeerConfigError(path, kind, data)
    for item in overrides:
        key, value = parse_override(item)
        _check_key_path(key, lines.of(()), f"override {item!r}", value)
        _set_dotted(data, key, value, f"override {item!r}")
        lines.where[tuple(_split_key(key))] = f"override {item!r}"
    recipe = _validate(data, lines)
    recipe._source = str(path)
    return recipe


def recipe_from_dict(data: dict, source: str = "<recipe>") -> Recipe:
    """Validates an in-memory recipe (tests, pipelines)."""
    recipe = _validate(data, _Lines(source))
    recipe._source = source
    return recipe


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise RecipeError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
    key, raw = item.split("=", 1)
    try:
        # YAML typing gives 1e-4 -> str (coerced by the schema), 20 -> int, null -> None, [a, b] -> list.
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _split_key(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _check_key_path(key: str, where: str, what: str, value: Any = None) -> None:
    """Rejects override keys that the schema does not know, before anything is set."""
    model: Any = Recipe
    parts = _split_key(key)
    for i, part in enumerate(parts):
        if model is None:  # inside a free-form dict (e.g. model.init_config): anything goes
            return
        if isinstance(part, int):
            continue
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(str(p) for p in parts[:i])
            hint = suggestion(key, value) or _did_you_mean(part, fields, prefix)
            raise RecipeError(f"{what}: unknown key {key!r}{hint}")
        model = _section_type(fields[part].annotation)


def _section_type(annotation: Any) -> type[Section] | None:
    """The Section class inside an annotation such as `AdapterCfg | None` or `list[DataSource]`."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _set_dotted(data: dict, key: str, value: Any, what: str) -> None:
    parts = _split_key(key)
    node: Any = data
    for part in parts[:-1]:
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise RecipeError(f"{what}: index {part} out of range")
            node = node[part]
            continue
        if not isinstance(node.get(part), (dict, list)):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise RecipeError(f"{what}: index {last} out of range")
    node[last] = value


def _did_you_mean(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    if not close:
        return ""
    full = f"{prefix}.{close[0]}" if prefix else close[0]
    return f" (did you mean {full!r}?)"


def _validate(data: dict, lines: _Lines) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = _describe(errors[0], lines)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise RecipeError(first + more) from None


def _describe(err: dict, lines: _Lines) -> str:
    loc = tuple(p for p in err["loc"] if not _is_union_tag(p))
    dotted = ".".join(str(p) for p in loc) or "<top level>"
    where = lines.of(loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _section_at(loc[:-1])
        names = parent.model_fields if parent else ()
        prefix = ".".join(str(p) for p in loc[:-1])
        value = err.get("input")
        hint = suggestion(str(loc[-1]), value if not isinstance(value, dict) else None)
        return f"{where}: unknown key {dotted!r}{hint or _did_you_mean(loc[-1], names, prefix)}"
    if kind == "missing":
        return f"{where}: missing required key {dotted!r}"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{where}: {dotted}: {msg}{shown}"


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the member type name for unions, e.g. ('model', 'init_config', 'dict[str,any]').
    return isinstance(part, str) and (
        "[" in part or part in {"str", "int", "float", "bool", "none"} or part.startswith("function-")
    )


def _section_at(loc: tuple) -> type[Section] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _section_type(model.model_fields[part].annotation)
    return model


# ----------------------------------------------------------------------------------------------
# Writing


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json", exclude_none=False)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=False)


def write_recipe(recipe: Recipe, path: Path) -> None:
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_recipe(recipe), encoding="utf-8")
    tmp.replace(path)


# Keys that may change between a run and its resumption: they do not change what is trained.
RESUME_MUTABLE = {
    ("run", "output_dir"),  # a moved run directory still resumes
    ("run", "max_skipped_steps"),
    ("run", "max_steps"), ("run", "epochs"), ("run", "log_every"), ("run", "eval_every"),
    ("run", "save_every"), ("run", "keep_last"), ("run", "resume"), ("run", "overwrite"), ("run", "report_to"),
    ("run", "sample_prompts"), ("run", "sample_max_new_tokens"), ("run", "eval_batches"), ("run", "eval_at_start"),
    ("run", "compile"), ("run", "chunked_ce"),  # the same maths (within rounding), another speed
    ("launch",),
}


def recipe_differences(old: dict, new: dict, path: tuple = ()) -> list[str]:
    """Dotted keys whose values differ in a way that makes resuming a different run."""
    if any(path[: len(m)] == m for m in RESUME_MUTABLE):
        return []
    if isinstance(old, dict) and isinstance(new, dict):
        diffs = []
        for key in sorted(set(old) | set(new), key=str):
            diffs += recipe_differences(old.get(key), new.get(key), path + (key,))
        return diffs
    return [] if old == new else [".".join(map(str, path))]
