"""Console output shared by every stage: one rich console on stderr, and `info` for the main process.

Kept apart from train/metrics.py (metrics.jsonl, trackers, the progress bar) because the data and
model stages print notes too, and they sit below the training loop.
"""

from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, highlight=False)


def info(message: str, accelerator=None) -> None:
    """Prints on the main process only (rank from accelerate, or from the launcher's env)."""
    main = accelerator.is_main_process if accelerator is not None else os.environ.get("RANK", "0") == "0"
    if main:
        console.print(message, soft_wrap=True)
