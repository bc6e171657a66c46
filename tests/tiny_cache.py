"""One tiny chat model per test session for the rollout / reward / rs_sft tests (building one
trains a BPE tokenizer: seconds that add up on two cores)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import save_tiny_chat_model

_SAVED: dict[str, Path] = {}


def shared_tiny_model(tmp_path_factory) -> Path:
    """Read-only: tests that change weights must copy it."""
    if "dir" not in _SAVED:
        _SAVED["dir"] = save_tiny_chat_model(tmp_path_factory.getbasetemp() / "tiny-shared-chat-model")
    return _SAVED["dir"]
