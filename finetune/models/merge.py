"""Adapter -> full weights, verified: `finetune merge ADAPTER_DIR OUT_DIR [--dtype ...] [--base ...]`.

merge_adapter loads the base model once, in the output dtype, puts the adapter on it, records
the logits of base+adapter on a few probe sequences, folds the adapter into the weights in place
(peft merge_and_unload; no second copy of the model is ever held), writes a plain transformers
model (safetensors, sharded past max_shard_size) with the tokenizer and chat template into a temp
dir next to OUT_DIR, then frees the model, loads the written files back with from_pretrained and
compares their logits with the recorded ones. Only a merge within tolerance is renamed to OUT_DIR;
merge_report.json and README.md in it name the base used and the measured difference.

Base model policy: the base recorded in adapter_config.json is used by default. `--base` replaces
it explicitly (a moved local copy, the Hub id of the same model, the unquantized original of a
QLoRA base); a base other than the recorded one is accepted only because the user asked for it,
and only if every adapter tensor fits its shapes; the report then carries a warning naming both.
A base stored pre-quantized is refused: a merge needs unquantized weights.

This module imports no torch at import time, so the CLI can build its parser cheaply.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.checks import output_dir_problem

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16",
               "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Max |merged - (base+adapter)| logit difference allowed, relative to max(1, max |logit|): fp32
# differs only in summation order; bf16/fp16 round W + BA to 8/11 mantissa bits.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class MergeError(UserError):
    """Bad merge input (adapter dir, base, output dir, dtype): one line, exit 2, nothing written."""


class MergeVerificationError(RuntimeError):
    """The written model's logits differ from base+adapter beyond tolerance; nothing was kept."""


@dataclass
class MergeReport:
    adapter_dir: str
    out_dir: str
    base: str  # the base the adapter was merged onto
    recorded_base: str | None  # base_model_name_or_path in adapter_config.json
    dtype: str  # fp32 | bf16 | fp16
    max_abs_logit_diff: float  # written model vs base+adapter on the probes
    tolerance: float
    adapter_effect: float  # max |base+adapter - base| logits: how much the adapter changes
    probe_tokens: int
    trained_quantization: str | None  # model.quantize of the training run, when its recipe is found
    tokenizer_source: str | None
    size_bytes: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        recorded = "" if self.recorded_base in (None, self.base) else f" (adapter recorded {self.recorded_base})"
        quant = f", adapter trained on it quantized ({self.trained_quantization})" if self.trained_quantization else ""
        out = [
            f"merged     {self.adapter_dir} -> {self.out_dir}",
            f"base       {self.base}{recorded}{quant}",
            f"dtype      {self.dtype}",
            f"verified   max |logit diff| {self.max_abs_logit_diff:.3g} over {self.probe_tokens} probe tokens "
            f"(tolerance {self.tolerance:.3g}); the adapter moves logits by up to {self.adapter_effect:.3g}",
            f"output     {self.out_dir} ({len(self.files)} files, {_human(self.size_bytes)})",
        ]
        return out + [f"note       {n}" for n in self.notes]


@dataclass
class _Plan:
    """Everything checked before any weight is loaded."""

    adapter_dir: Path
    out_dir: Path
    weights: Path
    config: dict
    base: str
    recorded_base: str | None
    dtype: str
    trained_quantization: str | None
    notes: list[str]


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path, dtype: str | None = None, base: str | None = None,
                  force: bool = False, max_shard_size: str | int = "5GB", device: str = "cpu") -> MergeReport:
    """Folds the LoRA adapter in adapter_dir into its base and writes a verified plain model to out_dir.

    dtype: fp32 | bf16 | fp16, or None for the base's own dtype (config.json), fp32 when it names none.
    base: a Hub id or local dir replacing the adapter's recorded base (see the module docstring).
    Raises MergeError on bad input and MergeVerificationError when the written model's logits differ
    from base+adapter beyond the dtype's tolerance; in both cases nothing is left in out_dir.
    """
    plan = _plan(Path(adapter_dir), Path(out_dir), dtype, base, force)
    tmp = plan.out_dir.parent / f".tmp-merge-{plan.out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        report = _merge_into(plan, tmp, max_shard_size, device)
        _replace(tmp, plan.out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


# ----------------------------------------------------------------------------------------------
# Checks before loading


def _plan(adapter_dir: Path, out_dir: Path, dtype: str | None, base: str | None, force: bool) -> _Plan:
    if not adapter_dir.is_dir():
        raise MergeError(f"adapter dir {adapter_dir} does not exist or is not a directory")
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        hint = " (it holds a full model: nothing to merge)" if (adapter_dir / "config.json").is_file() else ""
        raise MergeError(f"{adapter_dir} is not a PEFT adapter: no adapter_config.json{hint}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MergeError(f"{cfg_file}: unreadable adapter config: {_first_line(e)}") from None
    if config.get("peft_type") != "LORA":
        raise MergeError(f"{cfg_file}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
    weights = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), None)
    if weights is None:
        raise MergeError(f"{adapter_dir}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    recorded = config.get("base_model_name_or_path") or None
    notes: list[str] = []
    if base is None:
        if recorded is None:
            raise MergeError(f"{cfg_file} names no base model (base_model_name_or_path); pass --base PATH_OR_ID")
        base = recorded
    elif recorded is not None and not _same_ref(base, recorded):
        notes.append(f"warning: base {base} is not the adapter's recorded base {recorded}; used because --base "
                     "was given and every adapter tensor fits its shapes")
    _check_out_dir(out_dir, adapter_dir, base, force)
    base_config = _base_config(base, recorded)
    dtype_name = _resolve_dtype(dtype, base_config)
    return _Plan(adapter_dir, out_dir, weights, config, base, recorded, dtype_name,
                 _trained_quantization(adapter_dir), notes)


def _check_out_dir(out_dir: Path, adapter_dir: Path, base: str, force: bool) -> None:
    out = out_dir.resolve()
    protected = [adapter_dir.resolve(), Path.cwd().resolve()]
    if Path(base).exists():
        protected.append(Path(base).resolve())
    for p in protected:
        if out == p or out in p.parents:
            raise MergeError(f"OUT_DIR {out_dir} is or contains {p}: choose a new directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise MergeError(f"OUT_DIR {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise MergeError(f"OUT_DIR {out_dir} exists and is not empty; pass --force to replace it")
        # --force replaces a model, never an arbitrary directory given by mistake.
        if not ((out_dir / "config.json").is_file() or (out_dir / "merge_report.json").is_file()):
            raise MergeError(f"OUT_DIR {out_dir} holds files but no model (config.json); refusing to replace it "
                             "even with --force")
    # The merged model is written beside OUT_DIR first (.tmp-merge-*), then renamed into place: both
    # need its parent, probed now rather than after the base model is loaded and merged.
    problem = output_dir_problem(out_dir.parent)
    if problem:
        raise MergeError(f"OUT_DIR {out_dir}: {problem}")


def _same_ref(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _base_config(base: str, recorded: str | None):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        hint = "; pass --base PATH_OR_ID" if base == recorded else ""
        raise MergeError(f"cannot load the base model config of {base!r}: {_first_line(e)}{hint}") from None
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise MergeError(f"base {base!r} is stored quantized ({method}); a merge needs the unquantized weights: "
                         "pass --base with the original model")
    return config


def _resolve_dtype(dtype: str | None, base_config) -> str:
    if dtype is not None:
        if dtype not in DTYPE_NAMES:
            raise MergeError(f"--dtype {dtype!r}: expected one of fp32, bf16, fp16")
        return DTYPE_NAMES[dtype]
    own = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
    own = str(own).removeprefix("torch.") if own is not None else "float32"
    return own if own in TOLERANCE else "float32"


def _trained_quantization(adapter_dir: Path) -> str | None:
    """model.quantize of the run that wrote the adapter: final/ or checkpoints/step-N/model/."""
    import yaml

    for run_dir in (adapter_dir.parent, adapter_dir.parent.parent.parent):
        recipe = run_dir / "recipe.yaml"
        if recipe.is_file():
            try:
                return ((yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}).get("model") or {}).get("quantize")
            except (OSError, yaml.YAMLError, AttributeError):
                return None
    return None


# ----------------------------------------------------------------------------------------------
# Load, probe, merge, write, verify


def _merge_into(plan: _Plan, tmp: Path, max_shard_size, device: str) -> MergeReport:
    import gc

    import torch

    torch_dtype = getattr(torch, plan.dtype)
    model = _load_with_adapter(plan, torch_dtype, device)
    probes = _probe_inputs(model.get_input_embeddings().weight.shape[0], device)
    with torch.no_grad():
        reference = _logits(model, probes)
        with model.disable_adapter():
            effect = max((r - b).abs().max().item() for r, b in zip(reference, _logits(model, probes), strict=True))
    tied = bool(getattr(model.get_base_model().config.get_text_config(), "tie_word_embeddings", False))
    merged = model.merge_and_unload(safe_merge=True)
    notes = list(plan.notes) + _retie_embeddings(merged, tied)
    if effect == 0.0:
        notes.append("the adapter does not change the base's logits (untrained? lora_B is zero)")
    tokenizer, tok_source = _tokenizer(plan)
    rows = merged.get_input_embeddings().weight.shape[0]
    if tokenizer is None:
        notes.append("no tokenizer beside the adapter or in the base: none written")
    elif len(tokenizer) > rows:
        notes.append(f"warning: the tokenizer has {len(tokenizer)} tokens but the model {rows} embedding rows")
    if tokenizer is not None and merged.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    del model, merged
    gc.collect()
    diff = _verify_written(tmp, torch_dtype, device, probes, reference)
    tolerance = TOLERANCE[plan.dtype] * max(1.0, max(r.abs().max().item() for r in reference))
    if not diff <= tolerance:  # also catches NaN
        hint = " (try --dtype fp32)" if plan.dtype != "float32" else ""
        raise MergeVerificationError(f"merged model's logits differ from base+adapter by {diff:.3g} "
                                     f"(tolerance {tolerance:.3g} for {SHORT[plan.dtype]}); nothing written{hint}")
    if plan.trained_quantization:
        notes.append(f"QLoRA: the adapter was trained on the base quantized to {plan.trained_quantization}; it was "
                     f"merged onto the unquantized {plan.base} in {SHORT[plan.dtype]}, so outputs differ slightly "
                     "from those seen in training")
    report = MergeReport(
        adapter_dir=str(plan.adapter_dir), out_dir=str(plan.out_dir), base=plan.base,
        recorded_base=plan.recorded_base, dtype=SHORT[plan.dtype], max_abs_logit_diff=diff, tolerance=tolerance,
        adapter_effect=effect, probe_tokens=sum(p.numel() for p in probes),
        trained_quantization=plan.trained_quantization, tokenizer_source=tok_source, notes=notes,
    )
    _write_report(tmp, report)
    return report


def _load_with_adapter(plan: _Plan, torch_dtype, device: str):
    """The base in the output dtype with the adapter loaded exactly (every key used, every shape fits)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from finetune.models.loading import is_tied_token_key

    try:
        base = AutoModelForCausalLM.from_pretrained(plan.base, dtype=torch_dtype).to(device)
    except (OSError, ValueError) as e:
        raise MergeError(f"cannot load the base model {plan.base!r}: {_first_line(e)}") from None
    state = _load_adapter_state(plan.weights)
    rows = _adapter_vocab_rows(base, state, plan.config)
    if rows is not None and rows != base.get_input_embeddings().weight.shape[0]:
        # Training resized the embeddings for added tokens; their rows come with the adapter.
        base.resize_token_embeddings(rows, mean_resizing=False)
    fields = set(LoraConfig.__dataclass_fields__)
    config = LoraConfig(**{k: v for k, v in plan.config.items() if k in fields})
    config.inference_mode = True
    try:
        model = get_peft_model(base, config)
        result = set_peft_model_state_dict(model, state)
    except (ValueError, RuntimeError, KeyError, IndexError) as e:
        raise MergeError(f"adapter {plan.adapter_dir} does not fit base {plan.base!r}: {_load_error(e)}") from None
    # peft saves a tied head's token rows too when training resized the vocab; they are the embedding's.
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if not is_tied_token_key(model, k)]
    missing = [k for k in getattr(result, "missing_keys", []) if _is_adapter_key(k) and not is_tied_token_key(model, k)]
    if unexpected or missing:
        shown = (unexpected or missing)[:2]
        raise MergeError(f"adapter {plan.adapter_dir} does not fit base {plan.base!r}: "
                         f"{'unexpected' if unexpected else 'missing'} adapter keys {shown}")
    return model.to(device).eval()


def _is_adapter_key(key: str) -> bool:
    return any(part in key for part in ("lora_", "trainable_tokens", "modules_to_save"))


def _load_adapter_state(weights: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    if weights.suffix == ".safetensors":
        return load_file(weights)
    return torch.load(weights, map_location="cpu", weights_only=True)


def _load_error(e: BaseException) -> str:
    """torch's state-dict errors put the useful part ("size mismatch for ...") on a later line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else type(e).__name__)


def _adapter_vocab_rows(base, state: dict, config: dict) -> int | None:
    """The vocabulary size the adapter was trained with, when it tells: the rows of an embedding or
    head saved with it (peft saves them when training resized them; modules_to_save copies), else
    the highest trainable token index."""
    layers = [m for m in (base.get_input_embeddings(), base.get_output_embeddings()) if m is not None]
    names = [n for n, m in base.named_modules() if any(m is layer for layer in layers)]
    for key, value in state.items():
        if value.ndim == 2 and key.endswith(".weight") and "lora_" not in key and "trainable_tokens" not in key \
                and any(f".{name}." in f".{key}" for name in names):
            return int(value.shape[0])
    indices = config.get("trainable_token_indices") or []
    flat = [i for v in indices.values() for i in v] if isinstance(indices, dict) else list(indices)
    rows = base.get_input_embeddings().weight.shape[0]
    return max(flat) + 1 if flat and max(flat) >= rows else None


def _probe_inputs(vocab: int, device: str) -> list:
    """Three short sequences: two random, one of the highest ids (where added tokens live)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    seqs = [torch.randint(0, vocab, (1, 16), generator=g), torch.randint(0, vocab, (1, 7), generator=g)]
    top = torch.arange(max(0, vocab - 8), vocab)
    seqs.append(torch.cat([top, torch.randint(0, vocab, (4,), generator=g)]).unsqueeze(0))
    return [s.to(device) for s in seqs]


def _logits(model, probes: list) -> list:
    return [model(input_ids=p, use_cache=False).logits.float().cpu() for p in probes]


def _retie_embeddings(model, tied_before: bool) -> list[str]:
    """A tied embedding or head trained alone (modules_to_save) no longer equals its twin: save both,
    untied, so the written model is the one that was merged (peft unties such a pair itself; this
    also covers a head left on the old tensor). Equal weights are tied back."""
    import torch

    if not tied_before:
        return []
    untied = ["input and output embeddings differ after the merge (one was trained alone): saved untied"]
    cfg = model.config.get_text_config()
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is inp.weight:
        return []
    if out.weight.shape == inp.weight.shape and torch.equal(out.weight, inp.weight):
        out.weight = inp.weight
        cfg.tie_word_embeddings = model.config.tie_word_embeddings = True
        return []
    cfg.tie_word_embeddings = model.config.tie_word_embeddings = False
    return untied


def _tokenizer(plan: _Plan):
    """Tokenizer (with its chat template) from the adapter dir, a checkpoint's tokenizer/, or the base."""
    from transformers import AutoTokenizer

    candidates = [(plan.adapter_dir, "adapter"), (plan.adapter_dir.parent / "tokenizer", "checkpoint")]
    for path, source in candidates:
        if any((path / f).is_file() for f in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(path), f"{source} ({path})"
            except (OSError, ValueError):
                continue
    try:
        return AutoTokenizer.from_pretrained(plan.base), f"base ({plan.base})"
    except (OSError, ValueError):
        return None, None


def _verify_written(tmp: Path, torch_dtype, device: str, probes: list, reference: list) -> float:
    """Loads what was written, as a user will, and returns max |logits - reference|."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype).to(device).eval()
    with torch.no_grad():
        got = _logits(model, probes)
    del model
    return max((g - r).abs().max().item() for g, r in zip(got, reference, strict=True))


def _write_report(tmp: Path, report: MergeReport) -> None:
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    report.files = [str(p.relative_to(tmp)) for p in files] + ["merge_report.json", "README.md"]
    report.size_bytes = sum(p.stat().st_size for p in files)
    (tmp / "README.md").write_text(_readme(report), encoding="utf-8")
    (tmp / "merge_report.json").write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    report.size_bytes += sum((tmp / n).stat().st_size for n in ("README.md", "merge_report.json"))


def _readme(r: MergeReport) -> str:
    quant = (f"\nQLoRA: the adapter was trained on the base quantized to {r.trained_quantization}; it was merged "
             f"onto the unquantized base above in {r.dtype}.\n" if r.trained_quantization else "")
    notes = "".join(f"- {n}\n" for n in r.notes)
    return (
        f"# Merged model\n\nThe LoRA adapter `{r.adapter_dir}` folded into the base model `{r.base}`, "
        f"saved in {r.dtype} by `finetune merge`. A plain transformers model: no peft needed.\n{quant}\n"
        f"## Verification\n\nMax absolute logit difference between this model (as written, reloaded) and "
        f"base+adapter on {r.probe_tokens} probe tokens: **{r.max_abs_logit_diff:.3g}** "
        f"(tolerance {r.tolerance:.3g}). The adapter itself moves the base's logits by up to "
        f"{r.adapter_effect:.3g}.\n\n"
        + (f"## Notes\n\n{notes}\n" if notes else "")
        + "## Use\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH)\ntokenizer = AutoTokenizer.from_pretrained(PATH)\n```\n"
    )


def _replace(tmp: Path, out_dir: Path) -> None:
    """tmp -> out_dir; an existing (empty, or forced) out_dir is moved aside first and removed after."""
    old = out_dir.parent / f".old-merge-{out_dir.name}-{os.getpid()}"
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


# ----------------------------------------------------------------------------------------------
# CLI


def add_merge_arguments(parser) -> None:
    """Arguments of `finetune merge` (parser: an argparse (sub)parser)."""
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a PEFT adapter dir, e.g. runs/x/final")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the merged model (must not exist "
                        "or be empty, unless --force)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="dtype of the merged weights (default: the base model's own dtype)")
    parser.add_argument("--base", default=None, metavar="PATH_OR_ID",
                        help="base model to merge onto instead of the one recorded in adapter_config.json")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty OUT_DIR holding a model")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")


def cmd_merge(args) -> int:
    """`finetune merge`: 0 merged and verified; 2 bad input; 1 verification failed."""
    try:
        report = merge_adapter(args.adapter_dir, args.out_dir, dtype=args.dtype, base=args.base, force=args.force,
                               max_shard_size=getattr(args, "max_shard_size", "5GB"))
    except UserError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return e.exit_code
    except MergeVerificationError as e:
        print(f"finetune: failed: {e}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(line)
    return 0
