"""PPO's models: the policy, its reference, the critic, and how many copies of the base they hold.

- policy: `load_model(recipe)`: full weights, LoRA or QLoRA.
- reference: when the policy is an adapter on model.name, the same model with its adapters
  disabled (peft's `disable_adapter()`): no second copy. With full weights, a frozen copy.
- critic (`trainer.ppo.critic`):
  `separate` (default, as N+): a model body of its own (AutoModel: hidden states, no LM head) and
  a linear value head read at every position, trained in full. `critic_from: reward_model` takes
  the reward model's body and scalar head (N+), `policy` model.name's body with a fresh head
  (verifier-only runs). `adapter` (memory-lean): a second LoRA adapter named "critic" on the
  policy's own base plus a value head, so policy, reference and critic share one copy of the base
  (QLoRA on one GPU); with gradient checkpointing each layer is recomputed under the adapter it ran with.
- `ActorCritic` holds policy and critic in one module: accelerate/DDP wrap it once, one optimizer
  steps both and the gradient norm is clipped jointly, as N+'s PolicyAndValueWrapper does.
Dropout is switched off in every model: with dropout the "old" log-probs of the rollout and the
training forward differ, the ratio starts away from 1 and the KL estimates are biased (N+ detail).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from finetune.errors import RecipeError
from finetune.recipe.schema import Recipe, SamplingCfg
from finetune.rl.prefill import shared_prefill
from finetune.rl.rollout import generation_kwargs
from finetune.train.losses import gather_logprobs

CRITIC_ADAPTER = "critic"


def disable_dropout(model: nn.Module) -> None:
    """p = 0 in every nn.Dropout and every float `*dropout*` attribute (attention dropout is
    functional in transformers and reads a float copied from the config at construction)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens from 0, as generate does with left-padded prompts."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def keep_requires_grad(model: nn.Module):
    """peft's set_adapter/disable_adapter flip requires_grad of adapters they deactivate; a policy
    and a critic adapter trained together must both stay trainable (autograd drops the gradient
    of a leaf that no longer requires it)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def current_adapter(model: nn.Module) -> str:
    # LoraModel's, which set_adapter changes (PeftModel.active_adapter only follows PeftModel.set_adapter).
    return model.base_model.active_adapter


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str):
    previous = current_adapter(model)
    with keep_requires_grad(model):
        model.base_model.set_adapter(name)
        try:
            yield
        finally:
            model.base_model.set_adapter(previous)


def recompute_under_forward_adapter(policy: nn.Module) -> None:
    """With gradient checkpointing a layer's forward runs again during backward, when the active
    adapter may be another one (policy and critic adapters share the layers): record the adapter
    at forward time and recompute under it (torch checkpoint's context_fn)."""
    base = policy.get_base_model()
    if not getattr(base, "is_activation_checkpointing", False):
        return

    def context_fn():
        return contextlib.nullcontext(), active_adapter(policy, current_adapter(policy))

    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The reference model: the policy's base without any adapter."""
    with keep_requires_grad(model), model.disable_adapter():
        yield


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body (hidden states, no head) of a transformers or peft model."""
    inner = model.get_base_model() if is_peft(model) else model
    return inner.base_model


def response_logits(policy: nn.Module, input_ids, attention_mask, position_ids, start: int) -> torch.Tensor:
    """(rows, time - start, vocab) logits that predict tokens start.. of each row."""
    width = input_ids.shape[1] - start
    # logits_to_keep: only the response positions go through the LM head (prompts can be long).
    logits = policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False, logits_to_keep=width + 1).logits
    return logits[:, -(width + 1):-1]


# ---------------------------------------------------------------- sampling and the forward layout


@dataclass
class Generated:
    query: torch.Tensor  # (rows, prompt width) left-padded prompt ids
    query_mask: torch.Tensor
    response: torch.Tensor  # (rows, response width) right-padded; padding after the first stop token
    response_mask: torch.Tensor  # 1 on generated tokens up to and including the first stop token
    stopped: torch.Tensor  # (rows,) bool: a stop token was produced
    sampled_logprobs: torch.Tensor | None = None  # generate's own log-probs (checks only)

    def responses(self) -> list[list[int]]:
        lengths = self.response_mask.sum(1).tolist()
        return [row[:n] for row, n in zip(self.response.tolist(), lengths, strict=True)]


def model_inputs(query, query_mask, response, response_mask) -> dict:
    """Prompt + response rows: masks from lengths (never from ids == pad), positions from the mask."""
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    return {"input_ids": torch.cat([query, response], dim=1), "attention_mask": attention_mask,
            "position_ids": position_ids_from_mask(attention_mask), "start": query.shape[1]}


@contextlib.contextmanager
def _stop_tokens(model, stop_ids: list[int], pad_id: int):
    """transformers 5 reads eos_token_id from the model's generation_config when the call gives
    None (no stop tokens): set it there, and put it back afterwards."""
    config = (model.get_base_model() if is_peft(model) else model).generation_config
    saved = config.eos_token_id, config.pad_token_id
    config.eos_token_id, config.pad_token_id = (list(stop_ids) or None), pad_id
    try:
        yield
    finally:
        config.eos_token_id, config.pad_token_id = saved


@torch.no_grad()
def generate(policy, prompts: list[list[int]], sampling: SamplingCfg, stop_ids: list[int], pad_id: int,
             greedy: bool = False, with_logprobs: bool = False) -> Generated:
    """Left-padded generate calls of sampling.batch_size rows; after a row's first stop token every
    token becomes padding. with_logprobs also returns generate's own log-probs (for checks)."""
    device = next(policy.parameters()).device
    width = max(map(len, prompts))
    query = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    query_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = generation_kwargs(sampling, greedy, stop_ids, pad_id)
    del kwargs["eos_token_id"]  # from the generation config (see _stop_tokens)
    temperature = 1.0 if greedy else sampling.temperature
    full = (len(prompts), sampling.max_new_tokens)
    response = torch.full(full, pad_id, device=device)
    sampled = torch.zeros(full, device=device)
    was_training = policy.training
    policy.eval()
    try:
        with _stop_tokens(policy, stop_ids, pad_id):
            for start in range(0, len(prompts), sampling.batch_size):
                rows = slice(start, start + sampling.batch_size)
                out = policy.generate(input_ids=query[rows], attention_mask=query_mask[rows], use_cache=True,
                                      return_dict_in_generate=True, output_logits=with_logprobs,
                                      **shared_prefill(policy, query[rows], query_mask[rows]), **kwargs)
                new = out.sequences[:, width:]
                response[rows, :new.shape[1]] = new
                if with_logprobs:
                    sampled[rows, :new.shape[1]] = gather_logprobs(torch.stack(out.logits, 1), new, temperature)
    finally:
        policy.train(was_training)
    is_stop = torch.isin(response, torch.tensor(stop_ids, device=device, dtype=response.dtype))
    steps = torch.arange(response.shape[1], device=device)
    first = torch.where(is_stop, steps, response.shape[1]).min(1).values
    response_mask = (steps[None] <= first[:, None]).long()
    keep = int(response_mask.sum(1).max())  # drop columns that are padding in every row
    response = torch.where(response_mask.bool(), response, pad_id)[:, :keep]
    response_mask = response_mask[:, :keep]
    return Generated(query, query_mask, response, response_mask, is_stop.any(1),
                     (sampled[:, :keep] * response_mask) if with_logprobs else None)


class SeparateCritic(nn.Module):
    """A model body of its own (transformers AutoModel: hidden states, no LM head) and a linear
    value head read at every position: V(prefix up to t). Saved as the body's save_pretrained
    output plus value_head.safetensors."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body, self.head = body, head

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype))[..., 0].float()

    def save(self, path: Path, state_dict: dict) -> None:
        self.body.save_pretrained(path, state_dict=_strip(state_dict, "body."), safe_serialization=True)
        _save_head(path, state_dict)

    def load(self, path: Path) -> None:
        from finetune.train.checkpoint import load_weights

        # The head's file sits beside the body's shards and is no body weight.
        load_weights(self.body, path, skip=("value_head.safetensors",))
        _load_head(self.head, path)


class AdapterCritic(nn.Module):
    """The policy's base with the "critic" LoRA adapter active, and a linear value head. The
    policy is not registered as a submodule: ActorCritic already owns its parameters."""

    def __init__(self, policy: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self._policy = [policy]
        self.head = head

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        policy = self._policy[0]
        with active_adapter(policy, CRITIC_ADAPTER):
            hidden = backbone(policy)(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype))[..., 0].float()

    def save(self, path: Path, state_dict: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)  # peft wrote the critic adapter here already
        _save_head(path, state_dict)

    def load(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self._policy[0], load_file(path / "adapter_model.safetensors"),
                                  adapter_name=CRITIC_ADAPTER)
        _load_head(self.head, path)


def new_value_head(hidden_size: int) -> nn.Linear:
    """Zero-initialised: values start at 0 and the first updates fit the head, not noise."""
    head = nn.Linear(hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _save_head(path: Path, state_dict: dict) -> None:
    from safetensors.torch import save_file

    head = {k: v.contiguous() for k, v in _strip(state_dict, "head.").items()}
    save_file(head, Path(path) / "value_head.safetensors")


def _load_head(head: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(Path(path) / "value_head.safetensors"))


class ActorCritic(nn.Module):
    """Policy and critic in one module; forward gives the response logits and values (None
    without a critic: trainer.ppo.advantage grpo / rloo)."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None) -> None:
        super().__init__()
        self.policy, self.critic = policy, critic

    def forward(self, input_ids, attention_mask, position_ids, start: int):
        logits = response_logits(self.policy, input_ids, attention_mask, position_ids, start)
        if self.critic is None:
            return logits, None
        # The value of the state before response token t is read where its logits are.
        values = self.critic(input_ids, attention_mask, position_ids)[:, start - 1:-1]
        return logits, values

    def critic_parameter_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("critic.") or f".{CRITIC_ADAPTER}." in n}

    def save_pretrained(self, path, state_dict: dict | None = None, safe_serialization: bool = True, **_) -> None:
        """The policy as save_pretrained writes it (final/ loads with from_pretrained), the critic in critic/.
        Called by engine.save_final and checkpoint.save_checkpoint with the gathered state dict."""
        path = Path(path)
        state_dict = self.state_dict() if state_dict is None else state_dict
        self.policy.save_pretrained(path, state_dict=_strip(state_dict, "policy."), safe_serialization=True)
        if self.critic is not None:
            self.critic.save(path / "critic", _strip(state_dict, "critic."))

    def load_critic(self, path: Path) -> None:
        if self.critic is not None:
            self.critic.load(Path(path) / "critic")


def _strip(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# ---------------------------------------------------------------- construction from a recipe


@dataclass
class PPOModels:
    actor_critic: ActorCritic
    reference: nn.Module | None  # None: the policy with its adapters disabled
    notes: list[str] = field(default_factory=list)
    info: object = None  # finetune.models.loading.ModelInfo of the policy


def check_value_head_support(config, key: str = "trainer.ppo.critic") -> None:
    """A value head reads per-token hidden states of a model body (transformers' AutoModel);
    refuse, before any weight is loaded, a model type that has none."""
    from transformers import MODEL_MAPPING

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "hidden_size", None) is None or type(config) not in MODEL_MAPPING:
        raise RecipeError(f"{key}: a value head needs the per-token hidden states of a model body, but model "
                          f"type {config.model_type!r} has no hidden-state model (AutoModel) in transformers")


def reward_model_path(recipe: Recipe) -> str | None:
    paths = [r.path for r in recipe.trainer.rewards if r.type == "model"]
    return paths[0] if paths else None


def critic_source(recipe: Recipe) -> str:
    """'reward_model' or 'policy': where a separate critic's weights come from."""
    wanted = recipe.trainer.ppo.critic_from
    if wanted == "auto":
        return "reward_model" if reward_model_path(recipe) else "policy"
    if wanted == "reward_model" and not reward_model_path(recipe):
        raise RecipeError("trainer.ppo.critic_from: reward_model needs a {type: model, path: ...} entry in "
                          "trainer.rewards (or critic_from: policy)")
    return wanted


def base_copies(recipe: Recipe) -> tuple[int, list[str]]:
    """How many copies of a base model's weights the run holds, and what each is."""
    ppo = recipe.trainer.ppo
    what = ["policy"]
    what.append("reference: policy with adapters disabled (shared)" if recipe.adapter else "reference (frozen copy)")
    if not ppo.has_critic:
        what.append(f"no critic (advantage: {ppo.advantage})")
    elif ppo.critic == "adapter":
        what.append("critic: 'critic' adapter on the policy's base (shared)")
    else:
        what.append(f"critic (separate, from {critic_source(recipe).replace('_', ' ')}, trained in full)")
    what += [f"reward model {r.path} (scoring)" for r in recipe.trainer.rewards if r.type == "model"]
    return sum("shared" not in w and "no critic" not in w for w in what), what


def build_models(recipe: Recipe, tokenizer) -> PPOModels:
    from finetune.models.loading import load_model

    ppo = recipe.trainer.ppo
    policy, info = load_model(recipe, tokenizer)
    notes = list(info.notes)
    critic = None
    if ppo.has_critic:
        critic = adapter_critic(policy) if ppo.critic == "adapter" else separate_critic(recipe, tokenizer,
                                                                                          critic_source(recipe))
    reference = None
    if recipe.adapter is None:
        # A copy, not a second load: a second load draws added-token rows (and a from-scratch
        # model) afresh, and the KL would not start at 0.
        reference = copy.deepcopy(policy).requires_grad_(False).eval()
    for model in (policy, critic, reference):
        if model is not None:
            disable_dropout(model)
    return PPOModels(ActorCritic(policy, critic), reference, notes, info)


def adapter_critic(policy: nn.Module) -> AdapterCritic:
    """A second LoRA adapter, "critic", with the policy's adapter settings, and a fresh value head."""
    if not is_peft(policy):
        raise RecipeError("trainer.ppo.critic: adapter puts the critic on the policy's base as a second LoRA "
                          "adapter; it needs an adapter: section (or critic: separate)")
    config = copy.deepcopy(policy.peft_config["default"])
    # Added-token rows are trained (and owned) by the policy adapter alone.
    config.trainable_token_indices, config.modules_to_save = None, None
    policy.add_adapter(CRITIC_ADAPTER, config)
    for name, p in policy.named_parameters():  # an added adapter stays frozen until activated
        if f".{CRITIC_ADAPTER}." in name:
            p.requires_grad_(True)
    recompute_under_forward_adapter(policy)
    return AdapterCritic(policy, new_value_head(policy.get_base_model().config.get_text_config().hidden_size))


def separate_critic(recipe: Recipe, tokenizer, source: str) -> SeparateCritic:
    """From the reward model (its body and scalar head), or from model.name's body with a fresh
    head; fp32 weights trained in full (mixed precision autocasts the maths)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    from finetune.models.loading import load_config

    if source == "reward_model":
        path = Path(reward_model_path(recipe))
        if (path / "adapter_config.json").is_file():
            from peft import AutoPeftModelForSequenceClassification

            model = AutoPeftModelForSequenceClassification.from_pretrained(path, num_labels=1).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, use_safetensors=True)
        from finetune.models.reward_model import score_head

        body, head = model.base_model, score_head(model)
    elif recipe.model.init_config is not None:
        config = load_config(recipe, tokenizer)
        body = AutoModel.from_config(config)
        head = new_value_head(config.get_text_config().hidden_size)
    else:
        m = recipe.model
        body = AutoModel.from_pretrained(m.name, revision=m.revision, trust_remote_code=m.trust_remote_code,
                                         use_safetensors=None if m.allow_bin else True, dtype=torch.float32)
        head = new_value_head(body.config.get_text_config().hidden_size)
    body.float(), head.float()
    if tokenizer is not None and len(tokenizer) > body.get_input_embeddings().weight.shape[0]:
        body.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if recipe.model.gradient_checkpointing:  # transformers >= 5.2x's name; the old one goes in v6
        if hasattr(body, "activation_checkpointing_enable"):
            body.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return SeparateCritic(body, head)


def check_critic_tokenizer(recipe: Recipe, tokenizer) -> None:
    """A critic initialised from the reward model reads the policy's token ids: both must use the
    same vocabulary (checked from the tokenizer files, before any weight is loaded)."""
    ppo = recipe.trainer.ppo
    if not ppo.has_critic or ppo.critic != "separate" or critic_source(recipe) != "reward_model":
        return
    from transformers import AutoTokenizer

    path = reward_model_path(recipe)
    try:
        rm_tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise RecipeError(f"trainer.rewards: cannot read the reward model's tokenizer in {path!r}: {e}") from None
    if rm_tok.get_vocab() != tokenizer.get_vocab():
        ours, theirs = set(tokenizer.get_vocab().items()), set(rm_tok.get_vocab().items())
        diff = sorted(ours ^ theirs, key=lambda kv: kv[1])[:3]
        raise RecipeError(f"trainer.ppo.critic_from: the reward model {path!r} has a different tokenizer than the "
                          f"policy ({len(rm_tok)} vs {len(tokenizer)} tokens; e.g. {diff}); a critic initialised "
                          "from it would read the wrong token ids: train the reward model from the same base and "
                          "tokenizer, or set trainer.ppo.critic_from=policy")

