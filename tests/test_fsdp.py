"""launch.strategy fsdp: FSDP2 in two gloo CPU processes (finetune/train/sharding.py).

One sharded run (`finetune launch --strategy fsdp --num-processes 2`, micro 2 x accum 2 x 2
processes, clipping on) is the reference for everything here: it must equal one plain process
with the same global batch, its parameters must be DTensor shards while it trains, its
checkpoints are DCP shards inside the manifest-verified layout, a run preempted by SIGTERM on
one rank and restarted must reproduce it (weights and every logged loss), and its final/ is one
consolidated safetensors model that from_pretrained loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli.main import main
from finetune.errors import RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from finetune.train import checkpoint
from finetune.train.guards import PREEMPTED_EXIT
from tests.conftest import ROOT, free_port, read_losses, save_tiny_chat_model, tiny_sft_recipe, write

pytestmark = pytest.mark.slow  # about a minute: four process groups start

STEPS = 4


def recipe(tmp, model_dir, name: str, micro: int, accum: int, **run) -> dict:
    data = tiny_sft_recipe(tmp, model_dir, max_steps=STEPS, micro_batch_size=micro, grad_accum=accum,
                           precision="fp32", **run)
    data["run"]["output_dir"] = str(tmp / name)
    data["optim"]["max_grad_norm"] = 1.0  # the tiny model's norms are ~1.5: clipping acts on DTensor grads
    return data


def env() -> dict:
    # One thread per process, the repo importable (tests.fsdp_worker) from any directory.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def launch(path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", "launch", str(path), "--num-processes", "2",
                           "--strategy", "fsdp", "--master", f"127.0.0.1:{free_port()}", *flags],
                          capture_output=True, text=True, timeout=300, env=env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The sharded reference run (checkpoints every 2 steps) and one plain process, same global batch."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = save_tiny_chat_model(tmp / "model", tie_word_embeddings=True)  # a head shared with the embeddings
    path = write(tmp / "fsdp.yaml", json.dumps(recipe(tmp, model_dir, "fsdp", 2, 2, save_every=2)))
    proc = launch(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_recipe(recipe_from_dict(recipe(tmp, model_dir, "one", 8, 1)))
    return {"tmp": tmp, "model": model_dir, "path": path, "stderr": proc.stderr}


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_close_weights(a: dict, b: dict, tol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=k)


def test_two_sharded_processes_equal_one_plain_process(runs):
    tmp = runs["tmp"]
    assert "(fsdp," in runs["stderr"] and runs["stderr"].count("done:") == 1
    assert_close_weights(weights(tmp / "fsdp"), weights(tmp / "one"))
    assert read_losses(tmp / "fsdp") == pytest.approx(read_losses(tmp / "one"), rel=1e-5)
    # accelerate only starts the processes: no accelerate FSDP section, the engine shards
    assert "fsdp_config" not in (tmp / "fsdp" / "accelerate_config.yaml").read_text()


def test_checkpoints_are_dcp_shards_in_the_verified_layout(runs):
    from torch.distributed.checkpoint import FileSystemReader

    ckpt = checkpoint.latest_checkpoint(runs["tmp"] / "fsdp")  # verifies every file's hash
    assert ckpt is not None and ckpt.name == f"step-{STEPS}"
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "rng-0.pt", "rng-1.pt",
            "scheduler.pt", checkpoint.STATE_FILE} <= manifest.keys()
    assert not any(f.startswith("model/") or f == "optimizer.pt" for f in manifest)
    assert json.loads((ckpt / checkpoint.STATE_FILE).read_text())["num_processes"] == 2
    # each rank saved half of every layer's weight: the parameters were sharded when it was written
    meta = FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata
    up = meta["model.model.layers.0.mlp.up_proj.weight"]
    assert [list(c.sizes) for c in up.chunks] == [[32, 32], [32, 32]] and list(up.size) == [64, 32]
    assert any(k.startswith("optim.state.") for k in meta)


def test_final_is_one_consolidated_model_from_pretrained_loads(runs):
    from transformers import AutoModelForCausalLM

    final = runs["tmp"] / "fsdp" / "final"
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied, saved once
    assert "lm_head.weight" not in weights(runs["tmp"] / "fsdp")
    loaded = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert_close_weights(loaded, weights(runs["tmp"] / "one"))


def test_sigterm_on_one_rank_then_restart_equals_the_uninterrupted_run(runs):
    """torchrun + a hook (tests/fsdp_worker.py): after step 1 each rank records its parameters;
    after step 2 rank 1 alone gets SIGTERM; both checkpoint step-2 and exit 75. `finetune launch`
    then resumes it: weights and all four logged losses equal the uninterrupted sharded run."""
    tmp = runs["tmp"]
    data = recipe(tmp, runs["model"], "preempted", 2, 2)  # no save_every: the preemption's checkpoint only
    path = write(tmp / "preempted.yaml", json.dumps(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tests.fsdp_worker", "2",
           "run", str(path), "launch.strategy=fsdp", "launch.num_processes=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env(), cwd=tmp)
    # Both ranks stopped at the same step boundary (each says so below) with the preemption exit
    # code. torchrun's summary lists the children it saw fail before it tore the group down: both
    # on an idle machine, only the first on a loaded one, so at least one is required.
    assert proc.stderr.count(f"exitcode  : {PREEMPTED_EXIT}") >= 1, proc.stderr[-3000:]
    assert "preempted by SIGTERM after step 2" in proc.stderr
    assert "preempted by a signal to another process after step 2" in proc.stderr
    out = tmp / "preempted"
    assert not (out / "final").exists()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-2"]

    # sharded while training: DTensor parameters, each rank holding half of every layer's rows
    for rank in (0, 1):
        shapes = json.loads((out / f"shards-rank{rank}.json").read_text())
        up = shapes["model.layers.0.mlp.up_proj.weight"]
        assert up == {"type": "DTensor", "global": [64, 32], "local": [32, 32]}, up
        assert all(s["type"] == "DTensor" for s in shapes.values())

    resumed = launch(path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / 'step-2'}" in resumed.stderr
    assert_close_weights(weights(out), weights(tmp / "fsdp"))
    assert read_losses(out) == pytest.approx(read_losses(tmp / "fsdp"), rel=1e-5)
    assert len(read_losses(out)) == STEPS


def test_resume_with_another_process_count_is_refused_before_any_process(runs, capsys):
    run_dir = runs["tmp"] / "fsdp"
    before = sorted(p.name for p in run_dir.iterdir())
    code = main(["launch", str(runs["path"]), "run.max_steps=6", "--num-processes", "1", "--strategy", "fsdp",
                 "--master", f"127.0.0.1:{free_port()}"])
    err = capsys.readouterr().err
    assert code == 2
    assert [line for line in err.splitlines() if "error" in line] == [
        f"finetune: error: run.resume: {run_dir / 'checkpoints' / f'step-{STEPS}'} was written by 2 process(es); "
        "resume it with 2 (--num-processes x --nnodes), not 1"]
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_a_sharded_checkpoint_is_refused_by_an_unsharded_run(runs):
    """The engine's own check (torchrun users): the layout tells the strategy, before any weight is read."""
    class TwoProcesses:
        num_processes, process_index = 2, 0

    ckpt = runs["tmp"] / "fsdp" / "checkpoints" / f"step-{STEPS}"
    with pytest.raises(RecipeError, match="written under launch.strategy fsdp; resume it with fsdp"):
        checkpoint.load_checkpoint(TwoProcesses(), ckpt, torch.nn.Linear(2, 2), None, None)
    TwoProcesses.num_processes = 1
    with pytest.raises(RecipeError, match="written by 2 process"):
        checkpoint.load_checkpoint(TwoProcesses(), ckpt, torch.nn.Linear(2, 2), None, None)
