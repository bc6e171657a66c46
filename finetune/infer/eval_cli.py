"""`finetune eval MODEL_OR_RUN --data PATH [--task ...]`: held-out numbers for any model or run.

Tasks:
- `exact_match` (default): each prompt is decoded greedily (or `--n K` times at `--temperature`,
  default 1.0) and checked by a verifier from finetune.rl.rewards: `exact_match` (normalised string
  equality with the `--column` value, default `answer`), `numeric` (the last number equals it), or
  a function `module:fn` called like a reward function. A completion passes when its score is
  >= `--pass-threshold` (1.0: a 0/1 verifier's "correct"); truncated completions are scored like
  the others and counted in `truncated`. Greedy reports `exact_match`; with n > 1 samples the
  unbiased pass@k of Chen et al. 2021 (1 - C(n-c, k) / C(n, k), averaged over prompts) for k = 1,
  powers of two below n, and n. Data: `prompts` rows (prompt + answer columns), or conversations
  (`messages`, `prompt_completion`, ...) whose last assistant message is the reference.
- `perplexity`: token-mean negative log-likelihood over all documents (sum of NLL / number of
  predicted tokens, so long documents weigh by their length) and its exp. `text` rows are scored
  on every token (EOS appended, as pretraining does); conversations on their assistant tokens, as
  SFT's eval_loss. Documents longer than `--max-length` are cut into windows scored separately.
- `reward`: the mean score of greedy completions (or of n samples) under a reward model
  (`--reward-model DIR`, trainer.type reward output) or a reward function (`--reward-function`).

Everything is checked before the model loads: the data, its columns (naming the expected and the
present ones), the verifier or reward model. Results print as a table and are written as JSON to
`--out`, by default `eval-<task>-<data name>.json` in the run dir when MODEL_OR_RUN belongs to a
run (a run dir, its final/ or a checkpoint), else in the current directory.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError
from finetune.infer.generate_cli import (
    add_decoding_arguments,
    add_model_arguments,
    check_local_file,
    positive_int,
    settings_from_args,
)

TASKS = ("exact_match", "perplexity", "reward")
CONVERSATION_FORMATS = ("messages", "prompt_completion", "sharegpt", "alpaca")


@dataclass
class EvalData:
    """Where the eval rows come from (the --data flags)."""

    path: str
    format: str
    max_samples: int | None = None
    seed: int = 0
    split: str = "train"  # Hub datasets


@dataclass
class EvalResult:
    task: str
    metrics: dict[str, float]
    details: dict = field(default_factory=dict)  # counts and settings shown under the metrics
    samples: list[dict] = field(default_factory=list)  # per prompt/document, written to the JSON

    def table(self) -> str:
        rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in self.metrics.items()]
        rows += [(k, str(v)) for k, v in self.details.items()]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------- metric arithmetic (pure)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, eq. 1)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_metrics(scores: list[list[float]], threshold: float = 1.0, greedy: bool = True) -> dict[str, float]:
    """exact_match (one greedy completion per prompt) or pass@k for several k (n samples per prompt)."""
    n = len(scores[0])
    passed = [sum(s >= threshold for s in group) for group in scores]
    if n == 1 and greedy:
        return {"exact_match": sum(passed) / len(passed)}
    ks = sorted({1, n, *(2 ** i for i in range(1, n.bit_length()) if 2 ** i < n)})
    return {f"pass@{k}": statistics.fmean(pass_at_k(n, c, k) for c in passed) for k in ks}


def reward_metrics(scores: list[list[float]]) -> dict[str, float]:
    flat = [s for group in scores for s in group]
    return {"reward_mean": statistics.fmean(flat), "reward_std": statistics.pstdev(flat),
            "reward_min": min(flat), "reward_max": max(flat)}


# ---------------------------------------------------------------- data (no weights)


def read_rows(data: EvalData):
    from finetune.data.sources import read_source
    from finetune.recipe.schema import DataSource

    check_local_file(data.path, "--data")
    src = DataSource(path=data.path, format=data.format, max_samples=data.max_samples, split=data.split)
    return src, read_source(src, "--data", data.seed)


def check_columns(rows, needed: list[str], task: str, hint: str = "", formats: tuple[str, ...] = ()) -> None:
    """UserError naming the first row that lacks a needed column, and the columns it has."""
    from finetune.data.formats import FORMAT_COLUMNS

    for row in rows:
        missing = [c for c in needed if c not in row.data]
        if missing:
            present = ", ".join(map(str, row.data)) or "none"
            fits = [f for f in formats if all(c in row.data for c in FORMAT_COLUMNS[f])]
            hint = f" (these rows look like --format {fits[0]})" if fits else hint
            raise UserError(f"{row.origin}: eval task {task} needs column(s) {', '.join(map(repr, needed))}; "
                            f"missing {', '.join(map(repr, missing))} (present: {present}){hint}")


def prompt_set(data: EvalData, task: str, column: str) -> list:
    """Conversations whose messages are the prompt; `extra[column]` holds the reference."""
    from finetune.data.formats import FORMAT_COLUMNS, to_conversation

    fmt = data.format
    if fmt != "prompts" and fmt not in CONVERSATION_FORMATS:
        raise UserError(f"--format {fmt}: task {task} reads prompts or conversations "
                        f"({', '.join(('prompts', *CONVERSATION_FORMATS))})")
    src, rows = read_rows(data)
    needed = list(FORMAT_COLUMNS[fmt]) + ([column] if fmt == "prompts" and task == "exact_match" else [])
    check_columns(rows, needed, task, " (choose the reference with --column)" if column in needed else "",
                  formats=CONVERSATION_FORMATS if fmt == "prompts" else ())
    convs = [to_conversation(row, src) for row in rows]
    if fmt == "prompts":
        return convs
    for conv in convs:  # the last assistant message is the reference, what precedes it the prompt
        last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
        if last == 0:
            raise UserError(f"{conv.origin}: the reference (last assistant message) has no prompt before it")
        conv.extra[column] = conv.messages[last]["content"]
        conv.messages = conv.messages[:last]
    return convs


# ---------------------------------------------------------------- tasks (a loaded model)


def sample_groups(lm, convs: list, settings, n: int, batch_size: int) -> list[list]:
    """n completions per conversation (greedy when settings say so), grouped by prompt."""
    from finetune.infer.inference import generate

    flat = generate(lm, [c.messages for c in convs for _ in range(n)], settings, batch_size=batch_size)
    return [flat[i * n:(i + 1) * n] for i in range(len(convs))]


def score_groups(rewards, convs: list, groups: list[list]) -> list[list[float]]:
    prompts = [c.messages for c, g in zip(convs, groups, strict=True) for _ in g]
    rows = [c.extra for c, g in zip(convs, groups, strict=True) for _ in g]
    totals = rewards(prompts, [s.text for g in groups for s in g], rows).total
    out, i = [], 0
    for g in groups:
        out.append(totals[i:i + len(g)])
        i += len(g)
    return out


def eval_generations(lm, convs: list, rewards, task: str, settings, n: int, threshold: float,
                     column: str, batch_size: int = 16) -> EvalResult:
    """exact_match / pass@k (task exact_match) or mean reward (task reward) of sampled completions."""
    groups = sample_groups(lm, convs, settings, n, batch_size)
    scores = score_groups(rewards, convs, groups)
    metrics = pass_metrics(scores, threshold, settings.greedy) if task == "exact_match" else reward_metrics(scores)
    flat = [s for g in groups for s in g]
    metrics["truncated"] = sum(not s.stopped for s in flat) / len(flat)
    metrics["length_mean"] = statistics.fmean(s.tokens for s in flat)
    samples = [{"origin": c.origin, "prompt": c.messages, "reference": c.extra.get(column),
                "completions": [s.text for s in g], "scores": sc, "stopped": [s.stopped for s in g]}
               for c, g, sc in zip(convs, groups, scores, strict=True)]
    decoding = "greedy" if settings.greedy else f"{n} samples at temperature {settings.temperature}"
    return EvalResult(task, metrics, {"prompts": len(convs), "decoding": decoding}, samples)


def perplexity_units(tokenizer, data: EvalData) -> list[dict]:
    """{"origin", "ids", "labels"} per document: every token of text, assistant tokens of chats."""
    from finetune.data.formats import FORMAT_COLUMNS, to_conversation
    from finetune.data.tokenizer import encode_chat_turns, encode_text

    fmt = data.format
    if fmt not in ("text", *CONVERSATION_FORMATS):
        raise UserError(f"--format {fmt}: task perplexity reads text or conversations "
                        f"({', '.join(('text', *CONVERSATION_FORMATS))})")
    src, rows = read_rows(data)
    check_columns(rows, list(FORMAT_COLUMNS[fmt]), "perplexity", formats=CONVERSATION_FORMATS if fmt == "text" else ())
    units = []
    for row in rows:
        if fmt == "text":
            ids = encode_text(tokenizer, str(row.data["text"]))
            units.append({"origin": row.origin, "ids": ids, "labels": ids})
        else:
            # As in training: one unit per turn when a template's history cannot be masked at once.
            for enc in encode_chat_turns(tokenizer, to_conversation(row, src).messages, "assistant"):
                units.append({"origin": row.origin, "ids": enc["input_ids"], "labels": enc["labels"]})
    return units


def windows(unit: dict, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Consecutive max_length windows of a document; each window's first token is context only."""
    ids, labels = unit["ids"], unit["labels"]
    return [(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)
            if len(ids[i:i + max_length]) > 1]


def eval_perplexity(lm, units: list[dict], max_length: int, batch_size: int = 8) -> EvalResult:
    """Token-mean NLL over all documents (and per document in the samples)."""
    import torch

    from finetune.models.reward_model import pad_right
    from finetune.train.losses import count_trained_tokens, token_ce_sum

    jobs = [(k, w) for k, u in enumerate(units) for w in windows(u, max_length)]
    nll, count = [0.0] * len(units), [0] * len(units)
    with torch.no_grad():
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            ids, mask = pad_right([w[0] for _, w in chunk], 0)
            labels, _ = pad_right([w[1] for _, w in chunk], -100)  # -100: padding is never predicted
            logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device)).logits
            for row, (k, _) in enumerate(chunk):  # per row: a document's own sum, for the samples
                nll[k] += float(token_ce_sum(logits[row:row + 1], labels[row:row + 1].to(lm.device)))
                count[k] += count_trained_tokens(labels[row:row + 1])
    tokens = sum(count)
    if tokens == 0:
        raise UserError("nothing to score: no document has a predicted token (empty texts or conversations)")
    mean = sum(nll) / tokens
    samples = [{"origin": u["origin"], "tokens": c, "nll": s / c if c else None}
               for u, c, s in zip(units, count, nll, strict=True)]
    return EvalResult("perplexity", {"nll": mean, "perplexity": math.exp(min(mean, 50.0))},
                      {"documents": len(units), "tokens": tokens, "max_length": max_length}, samples)


# ---------------------------------------------------------------- scorers, output, CLI


def build_scorer(args):
    """The finetune.rl.rewards.Rewards that scores completions: the verifier, or the reward model/function."""
    from pydantic import ValidationError

    from finetune.recipe.schema import RewardCfg
    from finetune.rl.rewards import build_rewards

    if args.task == "exact_match":
        v = args.verifier
        cfg = {"type": "function", "function": v} if ":" in v else {"type": v, "column": args.column}
        key = "--verifier"
        if ":" not in v and v not in ("exact_match", "numeric"):
            raise UserError(f"--verifier {v}: expected exact_match, numeric or module:function")
    elif args.reward_model or args.reward_function:
        if args.reward_model and args.reward_function:
            raise UserError("give either --reward-model or --reward-function")
        cfg = ({"type": "model", "path": args.reward_model} if args.reward_model
               else {"type": "function", "function": args.reward_function})
        key = "--reward-model" if args.reward_model else "--reward-function"
    else:
        raise UserError("--task reward needs --reward-model DIR (a trainer.type reward output) "
                        "or --reward-function module:fn")
    try:
        return build_rewards([RewardCfg(**cfg)], key=key)
    except ValidationError as e:
        raise UserError(f"{key}: {e.errors()[0]['msg']}") from None


def default_out(args, ref) -> Path:
    name = f"eval-{args.task}-{Path(args.data).stem or 'data'}.json"
    return (ref.run_dir if ref.run_dir is not None else Path.cwd()) / name


def write_result(result: EvalResult, out: Path, args, ref) -> None:
    record = {"model": args.model, "loaded": ref.describe(), "task": result.task, "data": args.data,
              "format": args.format, "metrics": result.metrics, "details": result.details,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "samples": result.samples}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out)  # a reader never sees half a file


def add_eval_arguments(parser) -> None:
    """Arguments of `finetune eval`."""
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="local file/dir/glob or Hub dataset id")
    parser.add_argument("--task", choices=TASKS, default="exact_match")
    parser.add_argument("--format", default=None, choices=("text", "prompts", *CONVERSATION_FORMATS),
                        help="row format (default: prompts; text for perplexity)")
    parser.add_argument("--split", default="train", help="split of a Hub dataset (default train)")
    parser.add_argument("--column", default="answer", help="reference column of prompts rows (default answer)")
    parser.add_argument("--verifier", default="exact_match", help="exact_match | numeric | module:function")
    parser.add_argument("--pass-threshold", type=float, default=1.0, help="a completion passes at score >= this")
    parser.add_argument("--reward-model", metavar="DIR", help="task reward: a reward model dir")
    parser.add_argument("--reward-function", metavar="MODULE:FN", help="task reward: a reward function")
    parser.add_argument("--n", type=positive_int, default=1, help="samples per prompt (> 1: pass@k, sampled)")
    parser.add_argument("--max-samples", type=positive_int, default=None, help="evaluate a seeded subset of N rows")
    parser.add_argument("--max-length", type=positive_int, default=None,
                        help="perplexity window in tokens (default: the model's context, at most 2048)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--out", default=None, help="result JSON (default: eval-<task>-<data>.json in the run "
                        "dir, or the current dir)")
    add_decoding_arguments(parser, temperature=None, max_new_tokens=64)
    parser.set_defaults(seed=0)  # reproducible samples unless told otherwise


def cmd_eval(args) -> int:
    """`finetune eval`: prints the table, writes the JSON; 2 on bad input, found before the model loads."""
    from finetune.infer.inference import Loaded, load_model, load_tokenizer, resolve_model_ref

    args.format = args.format or ("text" if args.task == "perplexity" else "prompts")
    try:
        temperature = args.temperature if args.temperature is not None else (1.0 if args.n > 1 else 0.0)
        if args.n > 1 and temperature == 0:
            raise UserError(f"--n {args.n} samples need sampling: --temperature must be > 0")
        settings = settings_from_args(args, temperature)
        data = EvalData(args.data, args.format, args.max_samples, args.seed, args.split)
        ref = resolve_model_ref(args.model, args.base)
        tokenizer = load_tokenizer(ref, need_template=args.task != "perplexity" or args.format != "text")
        if args.task == "perplexity":
            units = perplexity_units(tokenizer, data)
        else:
            convs = prompt_set(data, args.task, args.column)
            rewards = build_scorer(args)
            rewards.check_rows(convs, "--data")
        lm = Loaded(load_model(ref, tokenizer, args.dtype), tokenizer, ref)
    except UserError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return e.exit_code
    if args.task == "perplexity":
        context = getattr(lm.model.config.get_text_config(), "max_position_embeddings", None) or 2048
        result = eval_perplexity(lm, units, args.max_length or min(context, 2048), args.batch_size)
    else:
        result = eval_generations(lm, convs, rewards, args.task, settings, args.n, args.pass_threshold,
                                  args.column, args.batch_size)
    out = Path(args.out) if args.out else default_out(args, ref)
    write_result(result, out, args, ref)
    print(f"eval {result.task}: {args.data} ({args.format}) on {ref.describe()}")
    print(result.table())
    print(f"wrote {out}")
    return 0

