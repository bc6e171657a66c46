"""`finetune generate` and `finetune chat`: argument parsing around finetune.infer.inference.

    finetune generate runs/sft/final --prompt "What is 7 + 5?"
    finetune generate runs/sft --file prompts.jsonl --json --max-new-tokens 64
    finetune generate runs/pretrain --raw --prompt "3 + 4 ="
    finetune chat runs/sft --system "Answer briefly." --temperature 0.7 --seed 1

Decoding is greedy unless --temperature > 0. Bad input (a missing run/final dir, an adapter whose
base cannot be loaded, a model without a chat template and no --raw, a malformed prompts file,
flags that cannot work together) is reported in one line with exit 2 before any weight loads.
The decoding and model flags are shared with `finetune eval` (add_model_arguments,
add_decoding_arguments, settings_from_args). Imports no torch at import time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from finetune.errors import UserError
from finetune.infer.inference import Settings, chat_loop, generate, load_for_inference


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports a bad value with exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def check_local_file(path: str, flag: str) -> None:
    """A path that names a data file but does not exist is a typo, not a Hub dataset id."""
    from finetune.data.sources import SUFFIXES

    if Path(path).suffix in SUFFIXES and not Path(path).exists():
        raise UserError(f"{flag} {path}: no such file")


def add_model_arguments(parser) -> None:
    """MODEL_OR_RUN, --base and --dtype: shared by generate, chat and eval."""
    parser.add_argument("model", metavar="MODEL_OR_RUN",
                        help="a model dir, an adapter dir (run on its base, unmerged), a run dir (its final/), "
                             "a checkpoint dir or a Hub id")
    parser.add_argument("--base", metavar="PATH_OR_ID", help="base model for an adapter (default: the one it records)")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="weights dtype (auto: bf16 on Ampere+ GPUs, fp16 on older GPUs, fp32 on the CPU)")


def add_decoding_arguments(parser, temperature: float | None = 0.0, max_new_tokens: int = 256) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed, --no-cache (eval: temperature None = auto)."""
    g = parser.add_argument_group("decoding (greedy unless --temperature > 0)")
    g.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    g.add_argument("--temperature", type=float, default=temperature, help="0: greedy; > 0: sample")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature)")
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling (with --temperature)")
    g.add_argument("--seed", type=int, default=None, help="seed the sampler (reproducible samples)")
    g.add_argument("--no-cache", action="store_true", help="decode without the KV cache (slow; for checks)")


def settings_from_args(args, temperature: float | None = None) -> Settings:
    """Settings from the decoding flags; UserError on values that cannot work together."""
    t = args.temperature if temperature is None else temperature
    if t < 0:
        raise UserError(f"--temperature {t}: expected T >= 0 (0: greedy)")
    if t == 0 and (args.top_p is not None or args.top_k is not None):
        raise UserError("--top-p/--top-k only apply when sampling: add --temperature T (> 0)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: expected 0 < P <= 1")
    if args.top_k is not None and args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: expected K >= 0 (0: off)")
    return Settings(args.max_new_tokens, t, 1.0 if args.top_p is None else args.top_p, args.top_k or 0,
                    args.seed, not args.no_cache)


def add_generate_arguments(parser) -> None:
    """Arguments of `finetune generate`."""
    add_model_arguments(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a user message; with --raw, text to continue)")
    src.add_argument("--file", metavar="PROMPTS", help="jsonl/json/csv/parquet with a `prompt` column "
                     "(a string or a list of messages; an optional `system` column)")
    parser.add_argument("--system", help="system message put before each prompt that has none")
    parser.add_argument("--raw", action="store_true", help="complete plain text, without the chat template")
    parser.add_argument("--json", action="store_true",
                        help='one JSON object per prompt: {"prompt", "completion", "tokens", "stopped"}')
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts decoded together (left-padded)")
    add_decoding_arguments(parser)


def read_prompts(path: str, raw: bool) -> list[tuple[Any, Any]]:
    """(prompt as given, prompt to encode) per row of a prompts file; DataError naming the row."""
    from finetune.data.formats import to_conversation
    from finetune.data.sources import column, read_source
    from finetune.recipe.schema import DataSource

    check_local_file(path, "--file")
    src = DataSource(path=path, format="prompts")
    out = []
    for row in read_source(src, "--file"):
        given = column(row, src, "prompt")
        if raw and not isinstance(given, str):
            raise UserError(f"{row.origin}: --raw needs a string prompt, got {type(given).__name__}")
        out.append((given, given if raw else to_conversation(row, src).messages))
    return out


def cmd_generate(args) -> int:
    """`finetune generate`: 0 done; 2 bad input (one line on stderr), found before any weight loads."""
    try:
        settings = settings_from_args(args)
        prompts = [(args.prompt, args.prompt)] if args.prompt is not None else read_prompts(args.file, args.raw)
        lm = load_for_inference(args.model, args.base, args.raw, args.dtype)
        completions = generate(lm, [p for _, p in prompts], settings, args.raw, args.system, args.batch_size)
    except UserError as e:
        return _fail(e)
    for (given, _), c in zip(prompts, completions, strict=True):
        if args.json:
            print(json.dumps({"prompt": given, "completion": c.text, "tokens": c.tokens, "stopped": c.stopped},
                             ensure_ascii=False), flush=True)
        elif len(prompts) == 1:
            print(c.text)
        else:
            shown = given if isinstance(given, str) else given[-1].get("content")
            print(f">>> {shown}\n{c.text}\n")
    return 0


def add_chat_arguments(parser) -> None:
    """Arguments of `finetune chat`."""
    add_model_arguments(parser)
    parser.add_argument("--system", help="system message opening the conversation")
    add_decoding_arguments(parser)


def cmd_chat(args) -> int:
    """`finetune chat`: reads stdin until /exit or EOF; 2 on bad input before the model loads."""
    try:
        settings = settings_from_args(args)
        lm = load_for_inference(args.model, args.base, raw=False, dtype=args.dtype)
    except UserError as e:
        return _fail(e)
    return chat_loop(lm, settings, args.system)


def _fail(e: UserError) -> int:
    print(f"finetune: error: {e}", file=sys.stderr)
    return e.exit_code
