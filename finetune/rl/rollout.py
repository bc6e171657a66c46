"""Rollouts: n sampled completions per chat prompt, with the log-probs that produced them.

Shared by rs_sft (sample -> score -> select) and ppo (sample -> score -> update).

- A prompt (a list of messages) is rendered with the chat template and its generation prompt and
  tokenized exactly as `encode_chat` tokenizes training text; each prompt is repeated n times and
  the copies are decoded in left-padded batches of `sampling.batch_size` sequences by transformers'
  `generate` with its KV cache.
- The recipe alone sets the sampling: every knob that `generate` would otherwise take from the
  model's own generation_config (a Hub model's repetition_penalty or top_k) is passed explicitly.
  `top_k: 0` and `top_p: 1` switch those filters off.
- Generation stops at EOS and at the template's end-of-turn token (`stop_token_ids`). A completion
  that reaches max_new_tokens without one is `truncated` (rs_sft never keeps those).
- `logprobs[t]` is log softmax(logits / temperature) of the sampled token under the model's raw
  logits: the policy's probability before top-k/top-p filtering, which is what PPO's ratio and KL
  need and what a forward pass recomputes (`completion_logprobs`; tested to match). They are
  recorded step by step by a logits processor, so memory is one (batch, vocab) block, not the
  (batch, new tokens, vocab) that generate's `output_logits` would keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from finetune.data.tokenizer import stop_token_ids
from finetune.recipe.schema import SamplingCfg
from finetune.rl.prefill import shared_prefill
from finetune.train.losses import gather_logprobs

# Everything generate() reads that changes the distribution, set to "off": values missing from
# the call are filled from model.generation_config, which must not change what the recipe asks.
NEUTRAL_GENERATION = {
    "num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0,
    "min_p": None, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_length": 0, "min_new_tokens": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "bad_words_ids": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "renormalize_logits": False,
    "exponential_decay_length_penalty": None, "num_return_sequences": 1,
}



@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    prompt_index: int  # position of the prompt in the list given to sample_completions
    sample_index: int  # 0..n-1 among that prompt's samples
    prompt: list[dict]  # the prompt messages
    prompt_ids: list[int]  # rendered prompt with the generation prompt, as the model saw it
    completion_ids: list[int]  # generated ids, the stop token included when there is one
    text: str  # the completion without special tokens (the stop token is not part of it)
    logprobs: torch.Tensor  # (len(completion_ids),) fp32 log-probs of completion_ids at sampling
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)

    @property
    def truncated(self) -> bool:
        return not self.stopped


@dataclass
class RolloutBatch:
    """Prompt + completion rows, right-padded, for a forward pass over rollouts (PPO, checks)."""

    input_ids: torch.Tensor  # (rows, time)
    attention_mask: torch.Tensor  # (rows, time) 1 on real tokens
    position_ids: torch.Tensor  # (rows, time)
    completion_mask: torch.Tensor  # (rows, time) 1 on completion tokens
    old_logprobs: torch.Tensor  # (rows, time) sampling-time log-probs on completion tokens, else 0

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                                     self.completion_mask, self.old_logprobs)))


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt with the generation prompt, tokenized as encode_chat tokenizes text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _LogprobRecorder(LogitsProcessor):
    """Sees the raw fp32 logits of every decoding step (it runs before the sampling warpers);
    at the next step the sampled token is the last input id, so its log-prob is read then."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.steps.append(self._read(input_ids[:, -1]))
        self.pending = scores.clone()  # later warpers may modify scores in place
        return scores

    def _read(self, tokens: torch.Tensor) -> torch.Tensor:
        return gather_logprobs(self.pending, tokens, self.temperature)

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, new tokens) log-probs, once generate has returned."""
        self.steps.append(self._read(last_tokens))
        return torch.stack(self.steps, dim=1)


def generation_kwargs(cfg: SamplingCfg, greedy: bool, stops: list[int], pad_id: int) -> dict:
    kwargs = dict(NEUTRAL_GENERATION, max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad_id)
    if greedy:
        return kwargs | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return kwargs | {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k}


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[list[dict]], cfg: SamplingCfg, n: int | None = None,
                       greedy: bool = False) -> list[Rollout]:
    """n completions per prompt (cfg.n by default), in prompt order then sample order.

    greedy=True decodes each prompt once greedily (n is then 1; log-probs at temperature 1).
    Seed torch's RNG beforehand for reproducible samples.
    """
    n = 1 if greedy else (cfg.n if n is None else n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    kwargs = generation_kwargs(cfg, greedy, stops, pad_id)
    temperature = 1.0 if greedy else cfg.temperature
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    was_training = model.training
    model.eval()
    rollouts: list[Rollout] = []
    try:
        for start in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[start:start + cfg.batch_size]
            rows = _generate(model, [encoded[i] for i, _ in chunk], kwargs, temperature, pad_id)
            for (i, j), (ids, logprobs) in zip(chunk, rows, strict=True):
                rollouts.append(_make_rollout(tokenizer, i, j, prompts[i], encoded[i], ids, logprobs, stops))
    finally:
        model.train(was_training)
    return rollouts


def _generate(model, prompt_ids: list[list[int]], kwargs: dict, temperature: float,
              pad_id: int) -> list[tuple[list[int], torch.Tensor]]:
    """One left-padded generate call: (new token ids, their log-probs) per row, before cutting."""
    width = max(map(len, prompt_ids))
    device = model.device
    input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], device=device)
    recorder = _LogprobRecorder(temperature)
    out = model.generate(input_ids=input_ids, attention_mask=mask, logits_processor=LogitsProcessorList([recorder]),
                         **shared_prefill(model, input_ids, mask), **kwargs)
    new = out[:, width:]
    logprobs = recorder.finish(new[:, -1]).float().cpu()
    return list(zip(new.cpu().tolist(), logprobs, strict=True))


@torch.no_grad()
def sample_from_ids(model, prompt_ids: list[list[int]], cfg: SamplingCfg, stops: list[int],
                    pad_id: int) -> list[tuple[list[int], bool]]:
    """One sampled completion per already tokenized prompt (generation prompt included), in
    `cfg.batch_size` batches, in eval mode: (ids up to and including the first stop token, stopped)."""
    kwargs = generation_kwargs(cfg, False, stops, pad_id)
    was_training = model.training
    model.eval()
    try:
        rows = [row for start in range(0, len(prompt_ids), cfg.batch_size)
                for row in _generate(model, prompt_ids[start:start + cfg.batch_size], kwargs, cfg.temperature, pad_id)]
    finally:
        model.train(was_training)
    return [cut_at_stop(ids, stops) for ids, _ in rows]


def cut_at_stop(ids: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """Rows that finished early are padded by generate: cut after the first stop token."""
    cut = next((k for k, t in enumerate(ids) if t in stops), None)
    return (ids[:cut + 1], True) if cut is not None else (ids, False)


def _make_rollout(tokenizer, i: int, j: int, prompt: list[dict], prompt_ids: list[int], ids: list[int],
                  logprobs: torch.Tensor, stops: list[int]) -> Rollout:
    kept, stopped = cut_at_stop(ids, stops)
    text = tokenizer.decode(kept[:-1] if stopped else kept, skip_special_tokens=True)
    return Rollout(i, j, prompt, prompt_ids, kept, text, logprobs[:len(kept)].clone(), stopped)


def collate_rollouts(rollouts: list[Rollout], pad_id: int) -> RolloutBatch:
    """Right-padded prompt + completion rows; positions count real tokens from 0 as in generate."""
    rows = [r.prompt_ids + r.completion_ids for r in rollouts]
    width = max(map(len, rows))
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    completion_mask = torch.zeros(shape, dtype=torch.long)
    old = torch.zeros(shape, dtype=torch.float32)
    for k, (r, row) in enumerate(zip(rollouts, rows, strict=True)):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        input_ids[k, :p + c] = torch.tensor(row)
        attention_mask[k, :p + c] = 1
        completion_mask[k, p:p + c] = 1
        old[k, p:p + c] = r.logprobs
    position_ids = torch.arange(width).expand(shape).clone()
    return RolloutBatch(input_ids, attention_mask, position_ids, completion_mask, old)


def completion_logprobs(model, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """(rows, time) log softmax(logits / temperature) of each token given the ones before it,
    aligned with input_ids (column 0 is 0); read it where batch.completion_mask is 1."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    lp = gather_logprobs(logits[:, :-1], batch.input_ids[:, 1:], temperature)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)
