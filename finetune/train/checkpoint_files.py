"""The checkpoint layout on disk, without torch: which checkpoints a run has, whether one is whole.

`finetune launch` and `finetune validate` read it in a process that never trains (importing torch
there cost ~1.3 s of CPU per launch); finetune.train.checkpoint writes and loads checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose save completed (a manifest is written last), oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path, verify: bool = True) -> Path | None:
    """The newest checkpoint that passes its manifest; corrupt ones are reported and skipped."""
    from finetune.console import info

    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path) if verify else None
        if problem is None:
            return path
        info(f"[yellow]warning:[/] checkpoint {path} is unusable ({problem}); trying the previous one")
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None when every file listed in the manifest is present with its size and hash."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"unreadable manifest: {e}"
    for rel, meta in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, expected {meta['size']}"
        if sha256(f) != meta["sha256"]:
            return f"{rel} is corrupt (hash mismatch)"
    return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_partial_checkpoints(output_dir: Path) -> None:
    for tmp in checkpoint_dir(output_dir).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_state(path: Path) -> dict:
    """A checkpoint's trainer_state.json (step, data position, number of processes)."""
    return json.loads((path / STATE_FILE).read_text())
