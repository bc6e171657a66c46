"""Console progress, metrics.jsonl and the optional accelerate trackers (TensorBoard, W&B).

Only the main process writes or prints. On a terminal a progress bar shows loss, tokens/s and
ETA; without one (CI, cluster logs) a plain line is printed every `run.log_every` steps.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from finetune.console import console


class MetricsLogger:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, accelerator=None,
                 title: str = "train") -> None:
        self.main = accelerator is None or accelerator.is_main_process
        self.accelerator = accelerator
        self.path = Path(output_dir) / "metrics.jsonl"
        self.total = total_steps
        self.start_time = time.perf_counter()
        self.start_step = start_step
        self.progress: Progress | None = None
        if self.main and sys.stderr.isatty():
            self.progress = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console,
                transient=False,
            )
            self.task = self.progress.add_task(title, total=total_steps, completed=start_step, status="")
            self.progress.start()

    def log(self, record: dict) -> None:
        """Appends one record to metrics.jsonl, forwards it to trackers and shows it."""
        if not self.main:
            return
        record = {k: _round(v) for k, v in record.items()}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            step = record.get("step")
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        line = format_record(record)
        if self.progress is not None:
            self.progress.update(self.task, completed=record.get("step", 0), status=line)
            if "eval_loss" in record:
                self.progress.console.print(line)
        else:
            console.print(f"{self.eta(record.get('step', 0))} {line}", soft_wrap=True)

    def advance(self, step: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step)

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return f"[{step}/{self.total}]"
        left = (time.perf_counter() - self.start_time) / done * (self.total - step)
        return f"[{step}/{self.total} eta {int(left // 60)}:{int(left % 60):02d}]"

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def format_record(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if key in ("step", "epoch", "time"):
            continue
        if isinstance(value, float):
            value = f"{value:.3g}" if key not in ("tokens_per_s",) else f"{value:,.0f}"
        parts.append(f"{key}={value}")
    return f"step {record.get('step', '?')} " + " ".join(parts)


def _round(v):
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.6g}")
    return v
