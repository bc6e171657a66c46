"""`finetune launch`: two gloo processes on the CPU equal one process with the same global batch."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli.main import main
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import free_port, read_metrics, save_tiny_chat_model, tiny_sft_recipe, write


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("model") / "tiny")


def sft(tmp, model_dir, name: str, micro_batch_size: int, **run) -> dict:
    data = tiny_sft_recipe(tmp, model_dir, max_steps=3, micro_batch_size=micro_batch_size, **run)
    data["run"]["output_dir"] = str(tmp / name)
    return data


def launch(tmp, data: dict, *flags: str, name: str = "r.yaml") -> subprocess.CompletedProcess:
    path = write(tmp / name, json.dumps(data))
    return subprocess.run([sys.executable, "-m", "finetune", "launch", str(path), *flags],
                          capture_output=True, text=True, timeout=300)


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5)


def test_two_processes_equal_one_with_the_same_global_batch(in_tmp, model_dir):
    def run(name: str, micro: int) -> dict:
        data = sft(in_tmp, model_dir, name, micro_batch_size=micro, eval_at_start=True)
        data["data"]["eval"][0]["max_samples"] = 5  # 5 eval units: 3 and 2 on the two ranks
        data["trainer"]["exact_match_samples"] = 1
        return data

    run_recipe(recipe_from_dict(run("one", 8)))
    proc = launch(in_tmp, run("two", 4), "--num-processes", "2", "--master", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(in_tmp / "one", in_tmp / "two")
    evals = [[r["eval_loss"] for r in read_metrics(in_tmp / name) if "eval_loss" in r] for name in ("one", "two")]
    assert len(evals[0]) == 2 and evals[1] == pytest.approx(evals[0], rel=1e-5)  # uneven eval shares
    # rank 0 alone writes: one record per logged step, one final/, the generated accelerate config
    steps = [r["step"] for r in read_metrics(in_tmp / "two") if "loss" in r]
    assert steps == [1, 2, 3]
    assert "num_processes: 2" in (in_tmp / "two" / "accelerate_config.yaml").read_text()
    assert "2 proc" in proc.stderr and proc.stderr.count("done:") == 1


def test_two_process_run_resumes_after_a_restart(in_tmp, model_dir):
    data = sft(in_tmp, model_dir, "run", micro_batch_size=4, save_every=2)
    data["run"]["max_steps"] = 4
    port = f"127.0.0.1:{free_port()}"
    assert launch(in_tmp, data, "--num-processes", "2", "--master", port).returncode == 0
    shutil.copytree(in_tmp / "run" / "final", in_tmp / "uninterrupted")
    shutil.rmtree(in_tmp / "run" / "final")  # as if killed after the step-2 checkpoint
    shutil.rmtree(in_tmp / "run" / "checkpoints" / "step-4")  # (a finished run keeps its last state)
    proc = launch(in_tmp, data, "--num-processes", "2", "--master", port)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stderr and "step-2" in proc.stderr
    a, b = load_file(in_tmp / "uninterrupted" / "model.safetensors"), weights(in_tmp / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_two_nodes_over_loopback(in_tmp, model_dir):
    data = sft(in_tmp, model_dir, "nodes", micro_batch_size=4)
    path = write(in_tmp / "r.yaml", json.dumps(data))
    master = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-m", "finetune", "launch", str(path), "--num-processes", "1",
                               "--nnodes", "2", "--node-rank", str(rank), "--master", master],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    run_recipe(recipe_from_dict(sft(in_tmp, model_dir, "single", micro_batch_size=8)))
    assert_same_weights(in_tmp / "single", in_tmp / "nodes")


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--gpus", "2"], "CUDA GPU(s) visible"),
    pytest.param(["--strategy", "zero3"], "needs DeepSpeed", marks=pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")),
    (["--nnodes", "2"], "needs the address of node 0"),
    (["--nnodes", "2", "--node-rank", "2", "--master", "10.0.0.1:29500"], "must be below"),
    (["--gpus", "1", "--num-processes", "1"], "either --gpus or --num-processes"),
])
def test_bad_launches_fail_before_any_process(capsys, in_tmp, model_dir, flags, fragment):
    path = write(in_tmp / "r.yaml", json.dumps(sft(in_tmp, model_dir, "out", 4)))
    assert main(["launch", str(path), *flags]) == 2
    assert fragment in capsys.readouterr().err
    assert not (in_tmp / "out").exists()


def test_port_in_use_is_reported(capsys, in_tmp, model_dir):
    path = write(in_tmp / "r.yaml", json.dumps(sft(in_tmp, model_dir, "out", 4)))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["launch", str(path), "--num-processes", "2", "--master", f"127.0.0.1:{port}"]) == 2
    assert f"port {port} is in use" in capsys.readouterr().err


def test_the_launching_process_does_not_import_torch(in_tmp, model_dir):
    # It validates, writes the accelerate config and starts accelerate: torch would cost every launch
    # ~1.3 s of CPU in a process that never trains. The started command is recorded, not run.
    path = write(in_tmp / "r.yaml", json.dumps(sft(in_tmp, model_dir, "out", 4)))
    code = ("import subprocess, sys; started = []; subprocess.call = lambda cmd, **k: started.append(cmd) or 0\n"
            "from finetune.cli.main import main\n"
            f"rc = main(['launch', {str(path)!r}, '--num-processes', '2'])\n"
            "assert rc == 0 and 'accelerate.commands.launch' in started[0], (rc, started)\n"
            "assert 'torch' not in sys.modules, 'launch imported torch'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (on CPU: tests/test_fsdp.py)")
def test_fsdp2_equals_one_process(in_tmp, model_dir):
    run_recipe(recipe_from_dict(sft(in_tmp, model_dir, "one", micro_batch_size=8)))
    proc = launch(in_tmp, sft(in_tmp, model_dir, "fsdp", micro_batch_size=4), "--num-processes", "2",
                  "--strategy", "fsdp", "--master", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(fsdp," in proc.stderr
    assert_same_weights(in_tmp / "one", in_tmp / "fsdp")

