"""Output-directory layout, atomic checkpoints and resume.

    <output_dir>/recipe.yaml            resolved recipe
    <output_dir>/metrics.jsonl          one JSON object per logged step
    <output_dir>/checkpoints/step-N/    model/ (save_pretrained: full model or adapter), tokenizer/,
                                        optimizer.pt, scheduler.pt, rng-<rank>.pt, trainer_state.json
                                        (launch.strategy fsdp: sharded/ instead of model/ and
                                        optimizer.pt: one DCP shard file per rank, sharding.py;
                                        zero2/zero3: deepspeed/ with every rank's ZeRO shard instead
                                        of optimizer.pt, and DeepSpeed's zero_to_fp32.py)
    <output_dir>/final/                 loadable with from_pretrained, tokenizer beside it

A checkpoint is written into checkpoints/.tmp-step-N, fsynced, listed in manifest.json (sizes and
sha256) and renamed when complete, so a run killed at any moment leaves every finished checkpoint
intact; leftovers of a killed save are removed. Resume verifies the manifest and falls back to the
previous checkpoint when the newest is truncated or corrupt.
Optimizer/scheduler/RNG files are read with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from finetune.errors import RecipeError
from finetune.train import deepspeed_support, sharding
from finetune.train.checkpoint_files import (  # noqa: F401 (the layout, re-exported)
    MANIFEST,
    STATE_FILE,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    read_state,
    remove_partial_checkpoints,
    verify_checkpoint,
)
from finetune.train.checkpoint_files import sha256 as _sha256


def save_checkpoint(accelerator, output_dir: Path, step: int, model, optimizer, scheduler,
                    state: dict, keep_last: int, tokenizer=None) -> Path:
    """Writes checkpoints/step-N atomically (all ranks call this).

    Files go to .tmp-step-N, are fsynced and listed with sizes and hashes in a manifest written
    last; then the directory is renamed. A failure (disk full) removes the partial directory on
    every rank and stops training, leaving the previous checkpoint as it was.
    """
    from finetune.train.guards import TrainingStopped

    root = checkpoint_dir(output_dir)
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        # Every rank owns its RNG stream (dropout, sampling); the rest is replicated under DDP.
        torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
        engine = deepspeed_support.is_engine(accelerator)
        if sharding.is_sharded(model):
            # FSDP2: every rank writes its own shard of the weights and optimizer state.
            sharding.save_sharded(tmp / sharding.SHARDED_DIR, model, optimizer)
            if accelerator.is_main_process:
                _write_main_files(tmp, None, None, None, scheduler, state, tokenizer)
        else:
            if engine:  # every rank writes its ZeRO shard; rank 0 lists them in the manifest below
                deepspeed_support.save_engine_state(model, tmp)
            state_dict = accelerator.get_state_dict(model)  # ZeRO-3: gathered from every rank
            if accelerator.is_main_process:
                _write_main_files(tmp, accelerator.unwrap_model(model), state_dict,
                                  None if engine else optimizer, scheduler, state, tokenizer)
    except OSError as e:
        error = e
    accelerator.wait_for_everyone()
    if _any_rank_failed(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output_dir, verify=False)
        reason = getattr(error, "strerror", None) or str(error or "failed on another rank")
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise TrainingStopped(f"could not write checkpoint step-{step} ({reason}); {kept}; "
                              "free disk space and rerun the same command to resume")
    if accelerator.is_main_process:
        _write_manifest(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_main_files(tmp: Path, model, state_dict, optimizer, scheduler, state: dict, tokenizer) -> None:
    """Rank 0's files; model is None when the ranks wrote it sharded (FSDP), optimizer None when
    they wrote its state themselves (FSDP, DeepSpeed)."""
    if model is not None:
        model.save_pretrained(tmp / "model", state_dict=state_dict, safe_serialization=True)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if tokenizer is not None:  # a tokenizer trained by this run must come back identical
        tokenizer.save_pretrained(tmp / "tokenizer")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))


def _write_manifest(tmp: Path) -> None:
    """fsync every file, then record sizes and hashes; the manifest marks the save complete."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
        files[str(f.relative_to(tmp))] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    step = json.loads((tmp / STATE_FILE).read_text()).get("step")
    with (tmp / MANIFEST).open("w") as fh:
        json.dump({"step": step, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _any_rank_failed(accelerator, failed: bool) -> bool:
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor(float(failed), device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restores weights, optimizer, scheduler and this rank's RNG; returns the trainer state.

    Refuses, before reading any weight, a checkpoint written by another number of processes (the
    data position counts micro-batches per rank: another count would re-read or skip data) or
    under another strategy (FSDP's sharded/, DeepSpeed's deepspeed/, everyone else's full model/)."""
    state = read_state(path)
    saved = state.get("num_processes", accelerator.num_processes)
    if saved != accelerator.num_processes:
        raise RecipeError(f"run.resume: {path} was written by {saved} process(es); resume it with "
                          f"{saved}, not {accelerator.num_processes}")
    written_sharded = (path / sharding.SHARDED_DIR).is_dir()
    if written_sharded != sharding.is_sharded(model):
        raise RecipeError(f"run.resume: {path} was written " + ("under launch.strategy fsdp; resume it with fsdp"
                          if written_sharded else "without FSDP sharding; resume it with the strategy it was "
                          "written with (not fsdp), or start a new run from it"))
    if written_sharded:
        sharding.load_sharded(path / sharding.SHARDED_DIR, model, optimizer)
    elif deepspeed_support.is_engine(accelerator):
        deepspeed_support.load_engine_state(model, path)  # weights and this rank's optimizer shard
    elif not (path / "optimizer.pt").is_file() and (path / deepspeed_support.ENGINE_TAG).is_dir():
        raise RecipeError(f"run.resume: {path} was written under zero2/zero3 (its optimizer state is DeepSpeed's, "
                          f"in {deepspeed_support.ENGINE_TAG}/); resume it with the strategy it was written with")
    else:
        load_weights(accelerator.unwrap_model(model), path / "model")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = path / f"rng-{accelerator.process_index}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state


def load_weights(model, model_dir: Path, skip: tuple[str, ...] = ()) -> None:
    """Loads save_pretrained output (full model or PEFT adapter) into an existing model; `skip`
    names safetensors files beside it that are not the model's (a critic's value head)."""
    adapter = model_dir / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        from finetune.models.loading import is_tied_token_key

        result = set_peft_model_state_dict(model, load_file(adapter))
        # peft saves the added-token delta under both tied names; one of them is expected to dangle.
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if not is_tied_token_key(model, k)]
        if unexpected:
            raise RuntimeError(f"{adapter}: unexpected adapter keys {unexpected[:3]}")
        return
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        if shard.name not in skip:
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
