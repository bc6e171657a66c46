"""Inference: load a trained model as it was saved and complete prompts (CLI: finetune.infer.generate_cli).

MODEL_OR_RUN may be
- a model dir (config.json): loaded as is;
- an adapter dir (adapter_config.json): the base it records (or --base) with the adapter on top,
  not merged, so what runs is exactly what was trained (a QLoRA adapter runs on the unquantized
  base); embeddings are resized first when the adapter's tokenizer added tokens;
- a run dir (recipe.yaml, metrics.jsonl, checkpoints/ or final/): its final/;
- a checkpoint dir (checkpoints/step-N): its model/ with tokenizer/ beside it;
- a Hub id, loaded through transformers.
Everything that can be checked without weights is checked first (`resolve_model_ref`), so bad input
fails in a second with one line (UserError, exit 2).

Prompts are rendered with the chat template and its generation prompt, tokenized exactly as
training tokenized chats (finetune.rl.rollout.encode_prompt); `raw` completes plain text tokenized as
pretraining documents. Decoding is greedy unless a temperature is given, with the KV cache, in
left-padded batches, and stops at EOS and the template's end-of-turn token. Every knob that
generate() would otherwise take from the model's generation_config is set explicitly
(finetune.rl.rollout.NEUTRAL_GENERATION), so the flags alone decide the output.

Like merge.py this module imports no torch at import time: the CLI builds its parser cheaply.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "checkpoints", "final")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class ModelRef:
    """What MODEL_OR_RUN points at, resolved without loading weights."""

    ref: str  # as given
    kind: str  # "model" | "adapter" | "hub"
    path: str  # the model dir, adapter dir or Hub id that is loaded
    tokenizer_path: str
    base: str | None = None  # adapter: the base model dir or Hub id
    run_dir: Path | None = None  # the run this model belongs to, when there is one

    def describe(self) -> str:
        return f"{self.path} (adapter on {self.base}, unmerged)" if self.kind == "adapter" else self.path


@dataclass
class Loaded:
    """A model ready for generation, with its tokenizer and where it came from."""

    model: Any
    tokenizer: Any
    ref: ModelRef

    @property
    def device(self):
        return self.model.device


@dataclass
class Settings:
    """Decoding settings; temperature 0 is greedy (top_p/top_k then do not apply)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    use_cache: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    prompt: Any  # the prompt as given: a string or a list of messages
    text: str  # decoded, without the stop token and special tokens
    tokens: int  # tokens generated, the stop token included
    stopped: bool  # ended on a stop token (False: cut at max_new_tokens)
    ids: list[int] = field(default_factory=list)


# ---------------------------------------------------------------- resolving MODEL_OR_RUN


def resolve_model_ref(ref: str, base: str | None = None) -> ModelRef:
    """Where the weights, tokenizer and base of `ref` are; UserError (one line) when unusable."""
    path = Path(ref).expanduser()
    if not path.exists():
        return _hub_ref(ref)
    if not path.is_dir():
        raise UserError(f"{ref} is a file; expected a model dir, an adapter dir, a run dir or a Hub id")
    run_dir = None
    if not _has_model(path) and (path / "model").is_dir() and (path / "tokenizer").is_dir():
        run = path.parent.parent if path.parent.name == "checkpoints" else None  # checkpoints/step-N
        return _resolved(ref, path / "model", path / "tokenizer", base, run)
    if not _has_model(path) and any((path / m).exists() for m in RUN_MARKERS):
        run_dir, path = path, path / "final"
        if not path.is_dir():
            raise UserError(f"run dir {ref} has no final/ model (unfinished run?); {_newest_checkpoint(run_dir)}")
    elif path.name == "final" and any((path.parent / m).exists() for m in ("recipe.yaml", "metrics.jsonl")):
        run_dir = path.parent
    if not _has_model(path):
        raise UserError(f"{path} holds no model: no config.json (full model) or adapter_config.json (adapter)")
    return _resolved(ref, path, path, base, run_dir)


def _has_model(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _newest_checkpoint(run_dir: Path) -> str:
    steps = sorted((p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return f"the newest checkpoint is {steps[-1]}: pass it instead" if steps else "it has no checkpoints either"


def _resolved(ref: str, model_dir: Path, tok_dir: Path, base: str | None, run_dir: Path | None) -> ModelRef:
    adapter_cfg = model_dir / "adapter_config.json"
    if not adapter_cfg.is_file():
        _check_causal_lm(model_dir / "config.json")
        return ModelRef(ref, "model", str(model_dir), _tokenizer_dir(tok_dir, None, ref), None, run_dir)
    try:
        config = json.loads(adapter_cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter_cfg}: unreadable adapter config: {_first_line(e)}") from None
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{model_dir} is a {config.get('task_type')} adapter (a reward model?), not a causal LM")
    recorded = config.get("base_model_name_or_path")
    base = base or recorded
    if not base:
        raise UserError(f"{adapter_cfg} names no base model (base_model_name_or_path); pass --base PATH_OR_ID")
    _check_base(base, model_dir, recorded)
    return ModelRef(ref, "adapter", str(model_dir), _tokenizer_dir(tok_dir, base, ref), base, run_dir)


def _check_causal_lm(config_file: Path) -> None:
    try:
        archs = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as e:
        raise UserError(f"{config_file}: unreadable model config: {_first_line(e)}") from None
    if archs and all(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"{config_file.parent} is a {archs[0]} (a reward model?), not a causal LM that generates")


def _check_base(base: str, adapter_dir: Path, recorded: str | None) -> None:
    """The base must be loadable before anything runs: a local dir with config.json, or a Hub id."""
    from transformers import AutoConfig

    where = "adapter_config.json base_model_name_or_path" if base == recorded else "--base"
    hint = "; pass --base PATH_OR_ID" if base == recorded else ""
    if not Path(base).expanduser().exists() and not HUB_ID.match(base):
        # A relative base is relative to the directory training ran in.
        raise UserError(f"{adapter_dir} is a LoRA adapter whose base model {base!r} ({where}) cannot be loaded: "
                        f"no such directory here (cwd {Path.cwd()}){hint}")
    try:
        AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        raise UserError(f"{adapter_dir} is a LoRA adapter whose base model {base!r} ({where}) cannot be loaded: "
                        f"{_first_line(e)}{hint}") from None


def _tokenizer_dir(tok_dir: Path, base: str | None, ref: str) -> str:
    if any((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        return str(tok_dir)
    if base is not None:
        return base  # an adapter saved without its tokenizer: the base's (checked when loaded)
    raise UserError(f"{ref}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) in {tok_dir}")


def _hub_ref(ref: str) -> ModelRef:
    if not HUB_ID.match(ref) or ref.startswith("."):
        raise UserError(f"{ref} does not exist (expected a model dir, an adapter dir, a run dir or a Hub id)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise UserError(f"{ref} is not a local directory and cannot be loaded as a Hub model: "
                        f"{_first_line(e)}") from None
    return ModelRef(ref, "hub", ref, ref)


# ---------------------------------------------------------------- loading


def load_tokenizer(ref: ModelRef, need_template: bool = True):
    """The tokenizer saved with the model (with its chat template); checked before weights load."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ref.tokenizer_path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {ref.ref} from {ref.tokenizer_path}: {_first_line(e)}") from None
    if need_template and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {ref.ref} ({ref.tokenizer_path}) has no chat template: "
                        "pass --raw to complete plain text")
    return tokenizer


def load_model(ref: ModelRef, tokenizer, dtype: str = "auto", device: str | None = None):
    """The causal LM in eval mode; dtype auto: the GPU's native 16-bit dtype (bf16, fp16 before
    Ampere), fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from finetune.models.precision import inference_dtype

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a CLI
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = inference_dtype(device)
    else:
        torch_dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype))
    source = ref.base if ref.kind == "adapter" else ref.path
    try:  # safetensors only, as in training: pickled .bin weights can run code when loaded
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the model {source!r}: {_first_line(e)}") from None
    if ref.kind == "adapter":
        model = _with_adapter(model, ref, tokenizer)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval()


def _with_adapter(base, ref: ModelRef, tokenizer):
    """peft's PeftModel on the base, unmerged; rows for tokens that training added come first."""
    from peft import PeftModel

    rows = base.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:  # training resized the embeddings (e.g. ChatML tokens); the adapter holds them
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    try:
        return PeftModel.from_pretrained(base, ref.path, is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"adapter {ref.path} does not fit base {ref.base!r}: {_first_line(e)}") from None


def load_for_inference(ref: str | ModelRef, base: str | None = None, raw: bool = False, dtype: str = "auto",
                       device: str | None = None) -> Loaded:
    """resolve -> tokenizer (checked) -> weights."""
    ref = ref if isinstance(ref, ModelRef) else resolve_model_ref(ref, base)
    tokenizer = load_tokenizer(ref, need_template=not raw)
    return Loaded(load_model(ref, tokenizer, dtype, device), tokenizer, ref)


# ---------------------------------------------------------------- generation


def stop_ids(lm: Loaded, raw: bool = False) -> list[int]:
    """EOS, the template's end-of-turn token (chat) and the model's own generation EOS ids."""
    from finetune.data.tokenizer import stop_token_ids
    from finetune.errors import TemplateError

    tok = lm.tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    if not raw:
        try:
            ids = stop_token_ids(tok)
        except TemplateError:  # a template our masks cannot split: its EOS and the model's still stop it
            pass
    own = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for i in own if isinstance(own, list) else [own]:
        if i is not None and i not in ids:
            ids.append(i)
    if not ids:
        raise UserError(f"{lm.ref.ref}: the tokenizer has no EOS token and the model names none: "
                        "nothing would stop generation")
    return ids


def encode(tokenizer, prompt, raw: bool, system: str | None = None) -> list[int]:
    """Prompt token ids: chat-templated with the generation prompt, or plain text as a document start."""
    from finetune.rl.rollout import encode_prompt

    if raw:
        if not isinstance(prompt, str):
            raise UserError("--raw completes plain text: a prompt must be a string, not a list of messages")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return encode_prompt(tokenizer, messages)


def generation_kwargs(settings: Settings, stops: list[int], pad_id: int) -> dict:
    from finetune.rl.rollout import NEUTRAL_GENERATION

    kwargs = dict(NEUTRAL_GENERATION, max_new_tokens=settings.max_new_tokens, eos_token_id=stops,
                  pad_token_id=pad_id, use_cache=settings.use_cache)
    if settings.greedy:
        return kwargs | {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return kwargs | {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p,
                     "top_k": settings.top_k}


def generate(lm: Loaded, prompts: list, settings: Settings, raw: bool = False, system: str | None = None,
             batch_size: int = 16, streamer=None) -> list[Completion]:
    """One completion per prompt (a string or a list of messages), in order, in left-padded batches."""
    import torch

    encoded = [encode(lm.tokenizer, p, raw, system) for p in prompts]
    stops = stop_ids(lm, raw)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else stops[0]
    kwargs = generation_kwargs(settings, stops, pad)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    out: list[Completion] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[pad] * (width - len(x)) + x for x in chunk], device=lm.device)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=lm.device)
            gen = lm.model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kwargs)
            for k, row in enumerate(gen[:, width:].tolist()):
                out.append(_completion(lm.tokenizer, prompts[start + k], row, stops))
    return out


def _completion(tokenizer, prompt, row: list[int], stops: list[int]) -> Completion:
    # Rows that finished early are padded by generate: cut after the first stop token.
    cut = next((k for k, t in enumerate(row) if t in stops), None)
    kept = row if cut is None else row[:cut + 1]
    text = tokenizer.decode(kept if cut is None else kept[:-1], skip_special_tokens=True)
    return Completion(prompt, text, len(kept), cut is not None, kept)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------- chat


def chat_loop(lm: Loaded, settings: Settings, system: str | None = None, stdin=None, stdout=None) -> int:
    """A REPL keeping the conversation, streaming each reply; /reset forgets it, /exit or EOF quits."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {lm.ref.describe()}; /reset starts over, /exit quits", file=sys.stderr)
    messages: list[dict] = []
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        text = line.strip()
        if text == "/reset":
            messages.clear()
            print("(conversation reset)", file=sys.stderr)
        elif text.startswith("/"):
            print(f"unknown command {text.split()[0]}: /reset starts over, /exit quits", file=sys.stderr)
        elif text:
            messages.append({"role": "user", "content": text})
            reply = generate(lm, [messages], settings, system=system, streamer=StreamPrinter(lm.tokenizer, stdout))[0]
            messages.append({"role": "assistant", "content": reply.text})
            if not reply.stopped:
                print(f"(cut at --max-new-tokens {settings.max_new_tokens})", file=sys.stderr)


def StreamPrinter(tokenizer, out):  # noqa: N802 - a class built on first use: transformers loads lazily
    """transformers' TextStreamer writing to `out` (not print), without the prompt or special tokens."""
    from transformers import TextStreamer

    class _Printer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Printer(tokenizer, skip_prompt=True, skip_special_tokens=True)
