"""`finetune plot RUN [RUN ...] [--out plot.png] [--metrics loss,eval_loss,...]`: curves from metrics.jsonl.

One subplot per metric present in any run (loss, eval_loss, eval_exact_match, reward, kl, lr,
tokens_per_s ...), the runs overlaid in each with a legend of run names, step on every x axis
and the metric's unit on its y axis (rs_sft logs one record per round: "round" on x). RUN is a run
dir or a metrics.jsonl file. A resumed run logs the steps after its checkpoint again: the last
value logged for a step is the one drawn.
Non-numeric and non-finite values (a grad_norm of None, a NaN loss) are left out.

The default output is `<RUN>/plot.png` for one run and `plot.png` in the current directory for
several. matplotlib is imported only here (Agg canvas, no display, no global backend change).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

# Never plotted by default: the x axis, bookkeeping, and the cumulative token count.
NOT_METRICS = {"step", "epoch", "time", "round", "tokens", "skipped_steps", "n"}
# Preferred order (what people look at first); other metrics follow alphabetically.
ORDER = ("loss", "eval_loss", "eval_ppl", "eval_exact_match", "eval_accuracy", "eval_pass@1", "eval_pass@n",
         "reward", "reward_mean", "eval_reward", "kl", "lr", "grad_norm", "tokens_per_s")
LABELS = {
    "loss": "train loss (nats/token)", "eval_loss": "eval loss (nats/token)", "eval_ppl": "eval perplexity",
    "eval_exact_match": "eval exact match (fraction)", "eval_accuracy": "eval pair accuracy (fraction)",
    "eval_reward_gap": "eval reward gap (chosen - rejected)", "eval_pass@1": "eval pass@1 (fraction)",
    "eval_pass@n": "eval pass@n (fraction)", "reward": "reward (mean per sample)", "kl": "KL to reference (nats)",
    "lr": "learning rate", "grad_norm": "gradient norm (L2, before clipping)", "tokens_per_s": "throughput (tokens/s)",
    "acceptance_rate": "acceptance rate (fraction)", "length_mean": "completion length (tokens)",
    "reward_mean": "reward (mean over samples)", "score": "score (mean over rollouts)",
    "eval_score": "held-out score (greedy)",
}


@dataclass
class RunMetrics:
    name: str  # legend label
    path: Path  # the metrics.jsonl read
    series: dict[str, list[tuple[float, float]]]  # metric -> (step, value) sorted by step
    by_round: bool = False  # rs_sft logs one record per round, its step is the round


def metrics_file(run: str) -> Path:
    p = Path(run)
    path = p if p.suffix == ".jsonl" or p.is_file() else p / "metrics.jsonl"
    if not path.is_file():
        where = "no such file" if not p.exists() else f"{p} has no metrics.jsonl"
        raise UserError(f"{run}: {where} (expected a run dir or a metrics.jsonl)")
    return path


def read_metrics(run: str, name: str | None = None) -> RunMetrics:
    """Every numeric, finite metric of a run, keyed by step; UserError when there is nothing to plot."""
    path = metrics_file(run)
    by_step: dict[str, dict[float, float]] = {}
    by_round = False
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not _number(step):
            continue
        by_round = by_round or "round" in record
        for key, value in record.items():
            if key not in NOT_METRICS and _number(value):
                by_step.setdefault(key, {})[float(step)] = float(value)  # later lines win (resume)
    if not by_step:
        raise UserError(f"{path}: no metric records to plot (the file is empty or has no step/value lines)")
    series = {k: sorted(v.items()) for k, v in by_step.items()}
    return RunMetrics(name or _run_name(path), path, series, by_round)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _run_name(path: Path) -> str:
    return path.parent.name if path.name == "metrics.jsonl" else path.stem


def unique_names(runs: list[RunMetrics]) -> None:
    """Two runs called final/ or sft/ in different places: prefix their parents to tell them apart."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.parent.name}/{r.name}"


def choose_metrics(runs: list[RunMetrics], wanted: list[str] | None) -> list[str]:
    present = {k for r in runs for k in r.series}
    if wanted:
        missing = [m for m in wanted if m not in present]
        if missing:
            raise UserError(f"--metrics: {', '.join(missing)} not in any run's metrics.jsonl "
                            f"(present: {', '.join(order_metrics(present))})")
        return wanted
    return order_metrics(present)


def order_metrics(names) -> list[str]:
    return sorted(names, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))


def build_figure(runs: list[RunMetrics], metrics: list[str]):
    """A matplotlib Figure with one labelled subplot per metric and one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x_label = "round" if all(r.by_round for r in runs) else "step (optimizer steps)"
    for ax, metric in zip(axes, metrics, strict=False):
        # Sparse series (eval every N steps, one point per round) need markers to be seen.
        sparse = max(len(r.series.get(metric, ())) for r in runs) <= 30
        for i, run in enumerate(runs):
            points = run.series.get(metric)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=run.name, color=f"C{i % 10}", marker="o" if sparse else None,
                    markersize=3, linewidth=1.4)
        ax.set_title(metric)
        ax.set_xlabel(x_label)
        ax.set_ylabel(LABELS.get(metric, metric))
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(runs) > 1 and ax.get_lines():
            ax.legend(fontsize="small")
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    if len(runs) == 1:
        fig.suptitle(runs[0].name)
    return fig


def plot_runs(runs: list[str], out: str | Path | None = None, metrics: list[str] | None = None) -> Path:
    """Reads the runs (all checked before drawing), draws and writes the PNG; returns its path."""
    read = [read_metrics(r) for r in runs]
    unique_names(read)
    chosen = choose_metrics(read, metrics)
    try:
        import matplotlib  # noqa: F401 - fail with a hint, not a traceback
    except ImportError:
        raise UserError("finetune plot needs matplotlib: pip install matplotlib") from None
    if out is None:
        one_run_dir = len(runs) == 1 and Path(runs[0]).is_dir()
        out = (Path(runs[0]) if one_run_dir else Path.cwd()) / "plot.png"
    out = Path(out)
    fig = build_figure(read, chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def add_plot_arguments(parser) -> None:
    """Arguments of `finetune plot`."""
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run dirs (or metrics.jsonl files) to overlay")
    parser.add_argument("--out", default=None, help="PNG to write (default: RUN/plot.png for one run, "
                        "./plot.png for several)")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics (default: all present)")


def cmd_plot(args) -> int:
    """`finetune plot`: 0 written; 2 missing/empty metrics or an unknown metric."""
    wanted = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        out = plot_runs(args.runs, args.out, wanted)
    except UserError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"wrote {out}")
    return 0


# A pipeline's picture: per training stage, what it trains on and what it is judged by.
STORY_TRAIN = ("score", "reward_mean", "loss")
STORY_EVAL = ("eval_score", "eval_pass@1", "eval_exact_match", "eval_loss")


def plot_story(out: Path, results: list[dict], runs: list[tuple[str, Path]]) -> Path:
    """First panel: held-out accuracy after each stage (bars); then one panel per training stage with
    its training metric (left axis) and its own eval metric (right axis, dashed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = len(runs) + bool(results)
    cols = min(3, panels)
    fig = Figure(figsize=(5.0 * cols, 3.4 * math.ceil(panels / cols)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = iter(fig.subplots(math.ceil(panels / cols), cols, squeeze=False).ravel())
    if results:
        ax = next(axes)
        names, values = [r["stage"] for r in results], [r["accuracy"] for r in results]
        bars = ax.bar(names, values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.bar_label(bars, fmt="%.2f", fontsize="small")
        ax.set_ylim(0, 1.05)
        ax.set_title("held-out accuracy after each stage")
        ax.set_ylabel("greedy accuracy (fraction)")
    for name, run in runs:
        m = read_metrics(str(run), name)
        ax = next(axes)
        # rs_sft logs rounds, ppo updates (each several optimizer steps), the rest optimizer steps.
        x_label = "round" if m.by_round else "update" if "score" in m.series else "step (optimizer steps)"
        train = next((k for k in STORY_TRAIN if k in m.series), None)
        evals = next((k for k in STORY_EVAL if k in m.series), None)
        for axis, key, style in ((ax, train, "-"), (ax.twinx() if train and evals else ax, evals, "--o")):
            if key is None:
                continue
            xs, ys = zip(*m.series[key], strict=True)
            color = "C0" if style == "-" else "C3"
            axis.plot(xs, ys, style, color=color, markersize=3, linewidth=1.4, label=key)
            axis.set_ylabel(LABELS.get(key, key), color=color)
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.set_visible(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
