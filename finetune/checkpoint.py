"""Output-directory layout, atomic checkpoints and resume.

    <output_dir>/recipe.yaml            resolved recipe
    <output_dir>/metrics.jsonl          one JSON object per logged step
    <output_dir>/checkpoints/step-N/    model/ (save_pretrained: full model or adapter), tokenizer/,
                                        optimizer.pt, scheduler.pt, rng-<rank>.pt, trainer_state.json
    <output_dir>/final/                 loadable with from_pretrained, tokenizer beside it

A checkpoint is written into checkpoints/.tmp-step-N and renamed when complete, so a run killed
at any moment leaves every finished checkpoint intact; leftovers of a killed save are removed.
Optimizer/scheduler/RNG files are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, output_dir: Path, step: int, model, optimizer, scheduler,
                    state: dict, keep_last: int, tokenizer=None) -> Path:
    """Writes checkpoints/step-N atomically (all ranks call this)."""
    root = checkpoint_dir(output_dir)
    tmp = root / f".tmp-step-{step}"
    final = root / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Every rank owns its RNG stream (dropout, sampling); the rest is replicated under DDP.
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if tokenizer is not None:  # a tokenizer trained by this run must come back identical
            tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def remove_partial_checkpoints(output_dir: Path) -> None:
    for tmp in checkpoint_dir(output_dir).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restores weights, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    load_weights(accelerator.unwrap_model(model), path / "model")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():  # absent when resuming with more processes than were saved
        _set_rng_state(torch.load(rng, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())


def load_weights(model, model_dir: Path) -> None:
    """Loads save_pretrained output (full model or PEFT adapter) into an existing model."""
    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        from finetune.model import is_tied_token_key

        result = set_peft_model_state_dict(model, load_file(adapter))
        # peft saves the added-token delta under both tied names; one of them is expected to dangle.
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if not is_tied_token_key(model, k)]
        if unexpected:
            raise RuntimeError(f"{adapter}: unexpected adapter keys {unexpected[:3]}")
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    if not state:
        raise RuntimeError(f"{model_dir}: no safetensors weights found")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied weights (e.g. lm_head tied to the embeddings); nothing else may be missing.
    tied = _tied_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{model_dir}: weights do not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def _tied_names(model) -> set[str]:
    by_storage: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_storage.setdefault(id(p), []).append(name)
    return {n for names in by_storage.values() if len(names) > 1 for n in names}


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        # numpy's state holds an ndarray; stored as a tensor so weights_only loading accepts it.
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
