"""Commands without a training run: exit codes 1 and 130, `finetune env`, the node rank that
`finetune launch --nnodes` picks up from SLURM / NODE_RANK, and a pipeline's --dry-run."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess

import pytest
import torch
import yaml

from finetune.cli import main as cli
from finetune.cli.main import main
from finetune.errors import RecipeError
from finetune.recipe.schema import load_recipe
from finetune.run.launch import check_launch
from tests.conftest import ROOT, tiny_pretrain_recipe, write

# ---------------------------------------------------------------- exit codes 1 and 130


def raising(exc: BaseException):
    def command(args) -> int:
        raise exc
    return command


def test_a_crash_exits_1_with_the_cause_first_then_the_traceback(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "env", raising(RuntimeError("disk on fire\nsecond line of detail")))
    assert main(["env"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "finetune: failed: RuntimeError: disk on fire"
    assert err[1] == "Traceback (most recent call last):" and "second line of detail" in err[-1]


def test_ctrl_c_outside_training_exits_130_without_a_traceback(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "env", raising(KeyboardInterrupt()))
    assert main(["env"]) == 130
    assert capsys.readouterr().err == "finetune: interrupted\n"


# ---------------------------------------------------------------- finetune env


def env_lines(capsys, *flags) -> list[str]:
    assert main(["env", *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_env_reports_versions_devices_and_every_strategy(capsys, monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    lines = env_lines(capsys)
    assert lines[0].split()[:2] == ["python", platform.python_version()]
    rows = {line.split()[0]: line.split()[1] for line in lines}
    assert rows["torch"] == torch.__version__ and rows["transformers"] == __import__("transformers").__version__
    assert "env           MASTER_ADDR=10.1.2.3" in lines
    if not torch.cuda.is_available():
        assert f"cpu           {os.cpu_count()} cores; multi-process runs use gloo" in lines
    assert [line.split()[1] for line in lines if line.startswith("strategy ")] == ["ddp", "fsdp", "zero2", "zero3"]


def launch_refusal(in_tmp, strategy: str) -> str | None:
    """What `finetune launch --num-processes 2 --strategy S` says before starting anything (None: ok)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write(in_tmp / "r.yaml", json.dumps(tiny_pretrain_recipe(in_tmp)))
    recipe = load_recipe(path, ["launch.num_processes=2", f"launch.strategy={strategy}",
                                f"launch.master=127.0.0.1:{port}"])
    try:
        check_launch(recipe, gpus_requested=False)
    except RecipeError as e:
        return str(e)
    return None


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_env_strategy_verdict_agrees_with_launch(capsys, in_tmp, strategy):
    (line,) = [x for x in env_lines(capsys, "--strategy", strategy) if x.startswith("strategy ")]
    assert line.split()[1] == strategy
    refusal = launch_refusal(in_tmp, strategy)
    assert (line.split()[2] == "ok:") == (refusal is None), (line, refusal)


# ---------------------------------------------------------------- launch --nnodes: the node rank


@pytest.fixture
def launched(in_tmp, monkeypatch):
    """Runs `finetune launch` up to the launcher's command line, which is recorded, not started."""
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    for var in ("SLURM_NODEID", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    path = str(write(in_tmp / "r.yaml", json.dumps(tiny_pretrain_recipe(in_tmp))))

    def launch(*flags: str, **env: str) -> tuple[list[str], dict] | int:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        rc = main(["launch", path, "--num-processes", "1", "--nnodes", "2", *flags])
        if rc != 0:
            assert not calls
            return rc
        cmd = calls.pop()
        config = yaml.safe_load(open(cmd[cmd.index("--config_file") + 1]))
        return cmd, config
    return launch


def free_master() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize(("env", "flags", "rank"), [
    ({"SLURM_NODEID": "1"}, [], 1),
    ({"NODE_RANK": "1"}, [], 1),
    ({"SLURM_NODEID": "0", "NODE_RANK": "1"}, [], 0),  # srun's own variable wins
    ({"SLURM_NODEID": "1"}, ["--node-rank", "0"], 0),  # the flag wins over both
    ({}, [], 0),
])
def test_node_rank_reaches_the_launcher(launched, env, flags, rank):
    cmd, config = launched("--master", free_master(), *flags, **env)
    assert config["machine_rank"] == rank and config["num_machines"] == 2
    assert cmd[cmd.index("--config_file") + 1].endswith(f"accelerate_config-node{rank}.yaml")
    assert f"launch.node_rank={rank}" in cmd and "launch.nnodes=2" in cmd  # every process sees it
    assert cmd[cmd.index("-m", cmd.index("--config_file")):][:3] == ["-m", "finetune", "run"]


def test_a_node_rank_variable_that_is_not_a_number_is_refused(launched, capsys, in_tmp):
    assert launched("--master", free_master(), SLURM_NODEID="node-a") == 2
    err = capsys.readouterr().err
    assert "SLURM_NODEID" in err and "node-a" in err and "Traceback" not in err
    assert not (in_tmp / "out").exists()


# ---------------------------------------------------------------- pipeline --dry-run


def test_pipeline_dry_run_prints_every_stage_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart's paths are relative to the repository
    before = sorted(p.name for p in (ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else None
    root = tmp_path / "story"
    assert main(["run", "recipes/quickstart.yaml", "--dry-run", f"pipeline.output_dir={root}"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("stage ")]
    assert [x.split()[1:3] for x in lines] == [["pretrain", "pretrain"], ["sft", "sft"], ["rs", "rs_sft"],
                                               ["merged", "merge"], ["ppo", "ppo"]]
    assert lines[0].endswith(f"-> {root / 'pretrain' / 'final'}") and lines[3].endswith(f"-> {root / 'merged'}")
    assert "merge stage:rs" in lines[3] and "from recipes/sft_full.yaml" in lines[1]
    assert not tmp_path.joinpath("story").exists() and list(tmp_path.iterdir()) == []
    after = sorted(p.name for p in (ROOT / "runs").iterdir()) if (ROOT / "runs").is_dir() else None
    assert after == before
