"""DeepSpeed ZeRO-2/3 (finetune/train/deepspeed_support.py).

Always: the generated JSON for the shipped recipes and what accelerate makes of it, the process
start, the checkpoint/resume routing against a stand-in engine, run.overwrite keeping the
launcher's files. With deepspeed installed (`pip install -e '.[deepspeed]'`; `make test` does not
install it, so these skip there): two CPU processes over gloo under ZeRO-2 and ZeRO-3 end with the
weights of one plain process, and a run resumed from its ZeRO checkpoint ends with the weights of
the uninterrupted run (slow: four launches, ~2.5 min on two shared cores).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import RecipeError
from finetune.recipe.schema import load_recipe, recipe_from_dict
from finetune.run.launch import accelerate_config, check_launch, clear_output_dir, deepspeed_config
from finetune.train import checkpoint, deepspeed_support
from finetune.train.engine import resolve_precision
from tests.conftest import ROOT, free_port, read_metrics, tiny_pretrain_recipe, write

HAS_DEEPSPEED = deepspeed_support.available()
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed not installed (pip install '.[deepspeed]')")


# ---------------------------------------------------------------------------------------------- the JSON


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
@pytest.mark.parametrize(("name", "overrides"), [
    ("sft_full.yaml", []),
    ("sft_lora.yaml", ["run.precision=bf16"]),
    ("sft_qlora.yaml", ["run.precision=fp16", "optim.max_grad_norm=0.3"]),
    ("dpo.yaml", ["run.grad_accum=3"]),
    ("reward.yaml", ["optim.max_grad_norm=null"]),
    ("pretrain_tiny.yaml", ["run.precision=fp32"]),
])
def test_config_states_the_recipes_own_values(name, overrides, strategy):
    r = load_recipe(ROOT / "recipes" / name, [*overrides, f"launch.strategy={strategy}", "launch.num_processes=4",
                                              "launch.nnodes=2", "launch.master=10.0.0.1:29500"])
    ds = deepspeed_config(r)
    run = r.run
    assert ds["train_micro_batch_size_per_gpu"] == run.micro_batch_size
    assert ds["gradient_accumulation_steps"] == run.grad_accum
    # DeepSpeed asserts micro x accumulation x data-parallel processes (4 per node x 2 nodes) == this
    assert ds["train_batch_size"] == run.micro_batch_size * run.grad_accum * 8
    assert ds["gradient_clipping"] == (r.optim.max_grad_norm or 0.0)
    precision = resolve_precision(r)
    assert ds["bf16"] == {"enabled": precision == "bf16"}
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["zero_optimization"]["stage"] == int(strategy[-1])
    assert ds["zero_optimization"].get("stage3_gather_16bit_weights_on_model_save") is (strategy == "zero3" or None)
    # the engine builds the optimizer and the recipe's schedule; accelerate refuses them in both places
    assert "optimizer" not in ds and "scheduler" not in ds and ds["zero_allow_untested_optimizer"] is True
    assert "auto" not in json.dumps(ds)
    cfg = accelerate_config(r, Path("ds.json"))
    assert cfg["distributed_type"] == "DEEPSPEED" and "mixed_precision" not in cfg
    assert cfg["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, no pdsh


def test_explicit_precisions_reach_the_json():
    r = load_recipe(ROOT / "recipes/sft_full.yaml", ["launch.strategy=zero2"])
    for precision, bf16, fp16 in (("bf16", True, False), ("fp16", False, True), ("fp32", False, False)):
        r.run.precision = precision
        ds = deepspeed_config(r)
        assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (bf16, fp16), precision


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_accelerate_keeps_every_stated_value(strategy, precision):
    """What accelerate 1.15's Accelerator and _prepare_deepspeed do to the file: set_mixed_precision
    with the engine's precision must not clash with it, and its fill with its own defaults
    (gradient_clipping 1.0, no 16-bit gather on save, the batch it infers) replaces only "auto"."""
    from accelerate.utils import DeepSpeedPlugin

    r = load_recipe(ROOT / "recipes/sft_lora.yaml", [f"launch.strategy={strategy}", "launch.num_processes=2",
                                                     f"run.precision={precision}", "optim.max_grad_norm=0.25"])
    ours = deepspeed_config(r)
    plugin = DeepSpeedPlugin(hf_ds_config=json.loads(json.dumps(ours)))
    plugin.set_mixed_precision(resolve_precision(r))
    plugin.deepspeed_config_process(must_match=False, **{
        "gradient_clipping": 1.0, "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
        "train_micro_batch_size_per_gpu": 99, "train_batch_size": 99 * r.run.grad_accum * 2})
    got = plugin.deepspeed_config
    assert got["gradient_clipping"] == 0.25 and got["train_micro_batch_size_per_gpu"] == r.run.micro_batch_size
    assert got["train_batch_size"] == ours["train_batch_size"]
    assert got["zero_optimization"] == ours["zero_optimization"] and plugin.zero_stage == int(strategy[-1])
    assert got["bf16"] == ours["bf16"] and got["fp16"]["enabled"] == ours["fp16"]["enabled"]
    # why every value is stated: an "auto" clipping would become accelerate's 1.0, not the recipe's 0.25
    auto = DeepSpeedPlugin(hf_ds_config={**json.loads(json.dumps(ours)), "gradient_clipping": "auto"})
    auto.deepspeed_config_process(must_match=False, gradient_clipping=1.0)
    assert auto.deepspeed_config["gradient_clipping"] == 1.0


# ---------------------------------------------------------------------------------------------- process start


def test_deepspeed_without_cuda_starts_on_gloo_not_as_plain_cpu_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert deepspeed_support.start_kwargs() == {"cpu": True}
    r = recipe_from_dict(tiny_pretrain_recipe(Path("/tmp"), grad_accum=3))
    assert deepspeed_support.accelerator_kwargs(r) == {"cpu": True}
    # accelerate turns DeepSpeed off under cpu=True; DeepSpeed's CPU accelerator runs over gloo
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert deepspeed_support.start_kwargs() == {"cpu": False, "backend": "gloo"}
    assert deepspeed_support.accelerator_kwargs(r) == {"cpu": False, "gradient_accumulation_steps": 3}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert deepspeed_support.start_kwargs() == {"cpu": False}


def test_missing_or_too_old_deepspeed_is_refused_before_any_process(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(deepspeed_support, "available", lambda: False)
    assert "pip install 'finetune[deepspeed]'" in deepspeed_support.launch_problem()
    monkeypatch.setattr(deepspeed_support, "available", lambda: True)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.18.2")
    assert "deepspeed 0.18.2 is older than 0.19" in deepspeed_support.launch_problem()
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.19.0")
    assert deepspeed_support.launch_problem() is None


def test_sharded_strategies_accept_checkpointing(in_tmp, monkeypatch):
    monkeypatch.setattr(deepspeed_support, "launch_problem", lambda: None)  # as if deepspeed >= 0.19 were installed
    port = free_port()
    path = write(in_tmp / "r.yaml", json.dumps(tiny_pretrain_recipe(in_tmp, save_every=2)))
    for strategy in ("zero2", "zero3", "fsdp"):  # every rank writes its shard (deepspeed_support, sharding)
        check_launch(load_recipe(path, [f"launch.strategy={strategy}", "launch.num_processes=2",
                                        f"launch.master=127.0.0.1:{port}"]), gpus_requested=False)


def test_overwrite_keeps_the_files_the_launcher_wrote(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for rel in ("deepspeed_config.json", "accelerate_config.yaml", "metrics.jsonl", "final/model.safetensors",
                "checkpoints/step-2/manifest.json"):
        write(out / rel, "x")
    monkeypatch.setenv("FINETUNE_LAUNCH_FILES", f"{out / 'accelerate_config.yaml'}:{out / 'deepspeed_config.json'}")
    clear_output_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["accelerate_config.yaml", "deepspeed_config.json"]
    monkeypatch.delenv("FINETUNE_LAUNCH_FILES")
    clear_output_dir(out)  # a run not started by `finetune launch`: everything goes
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- checkpoints


class FakeEngine(torch.nn.Module):
    """The DeepSpeedEngine's checkpoint surface: save_checkpoint writes this rank's shard under the tag."""

    def __init__(self, module) -> None:
        super().__init__()
        self.module = module
        self.loaded: list[tuple] = []

    def save_checkpoint(self, save_dir, tag=None, save_latest=True):
        assert not save_latest  # the manifest, not DeepSpeed's `latest` file, says what is complete
        shard = Path(save_dir) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        shard.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"optimizer_state_dict": {"step": torch.tensor(7.0)}}, shard)

    def load_checkpoint(self, load_dir, tag=None, load_optimizer_states=True, load_lr_scheduler_states=True):
        self.loaded.append((Path(load_dir), tag, load_optimizer_states, load_lr_scheduler_states))
        return str(Path(load_dir) / tag), {}


class FakeAccelerator:
    def __init__(self, deepspeed: bool) -> None:
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.DEEPSPEED if deepspeed else DistributedType.NO
        self.num_processes, self.process_index, self.is_main_process = 1, 0, True

    def wait_for_everyone(self) -> None:
        pass

    def get_state_dict(self, model):
        return self.unwrap_model(model).state_dict()

    def unwrap_model(self, model):
        return getattr(model, "module", model)


def test_zero_checkpoint_holds_the_engine_shards_in_the_manifest_and_resumes_through_the_engine(tmp_path):
    from finetune.train.engine import build_scheduler
    from tests.test_engine import tiny_model

    r = recipe_from_dict(tiny_pretrain_recipe(tmp_path))
    model = FakeEngine(tiny_model())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = build_scheduler(r, optimizer, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    acc = FakeAccelerator(deepspeed=True)
    path = checkpoint.save_checkpoint(acc, tmp_path, 3, model, optimizer, scheduler, {"step": 3, "num_processes": 1},
                                      keep_last=2)
    files = json.loads((path / checkpoint.MANIFEST).read_text())["files"]
    assert "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt" in files and "optimizer.pt" not in files
    assert {"scheduler.pt", "rng-0.pt", "trainer_state.json", "model/model.safetensors"} <= set(files)
    assert checkpoint.verify_checkpoint(path) is None
    # a truncated shard is caught like any other file, so resume falls back to the previous checkpoint
    shard = path / "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-5])
    assert "deepspeed/zero_pp_rank_0" in checkpoint.verify_checkpoint(path)
    shutil.rmtree(path)
    path = checkpoint.save_checkpoint(acc, tmp_path, 3, model, optimizer, scheduler, {"step": 3, "num_processes": 1},
                                      keep_last=2)

    fresh = FakeEngine(tiny_model(seed=1))
    fresh_scheduler = build_scheduler(r, torch.optim.AdamW(fresh.parameters(), lr=1e-3), 10)
    state = checkpoint.load_checkpoint(acc, path, fresh, None, fresh_scheduler)
    assert state["step"] == 3 and fresh_scheduler.last_epoch == 3
    # weights and the optimizer shard come from the engine; its LR schedule is not the one the loop steps
    assert fresh.loaded == [(path, "deepspeed", True, False)]
    # a plain (ddp) resume of a ZeRO checkpoint says which strategy wrote it
    with pytest.raises(RecipeError, match="written under zero2/zero3"):
        checkpoint.load_checkpoint(FakeAccelerator(deepspeed=False), path, fresh.module, optimizer, scheduler)
    # and a ZeRO resume of a ddp checkpoint likewise
    plain = checkpoint.save_checkpoint(FakeAccelerator(deepspeed=False), tmp_path, 4, model.module, optimizer,
                                       scheduler, {"step": 4, "num_processes": 1}, keep_last=2)
    with pytest.raises(RecipeError, match="without zero2/zero3"):
        checkpoint.load_checkpoint(acc, plain, fresh, None, fresh_scheduler)


# ---------------------------------------------------------------------------------------------- real runs


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_close_weights(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One process, micro 8 x accumulation 2, 4 steps: the reference for two ZeRO processes of micro 4."""
    from finetune.run.launch import run_recipe
    from tests.tiny_cache import shared_tiny_model

    tmp = tmp_path_factory.mktemp("plain")
    model_dir = shared_tiny_model(tmp_path_factory)
    run_recipe(recipe_from_dict(zero_sft(tmp, model_dir, "plain", micro_batch_size=8)))
    return model_dir, weights(tmp / "plain"), trained_steps(tmp / "plain")


def trained_steps(out: Path) -> list[float]:
    """Loss, gradient norm before clipping and lr of every logged step, in one list."""
    return [r[key] for r in read_metrics(out) if "loss" in r for key in ("loss", "grad_norm", "lr")]


def zero_sft(tmp: Path, model_dir: Path, name: str, micro_batch_size: int) -> dict:
    from tests.conftest import tiny_sft_recipe

    data = tiny_sft_recipe(tmp, model_dir, max_steps=4, micro_batch_size=micro_batch_size, grad_accum=2,
                           precision="fp32", save_every=2)
    data["optim"]["max_grad_norm"] = 0.5  # the engine clips (the tiny model's norms are ~1.3)
    data["trainer"]["exact_match_samples"] = 0
    data["run"]["output_dir"] = str(tmp / name)
    return data


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_two_cpu_processes_under_zero_equal_one_process_and_resume_exactly(in_tmp, plain_run, strategy):
    from tests.test_launch import launch

    model_dir, plain, plain_steps = plain_run
    data = zero_sft(in_tmp, model_dir, strategy, micro_batch_size=4)
    port = f"127.0.0.1:{free_port()}"
    proc = launch(in_tmp, data, "--num-processes", "2", "--strategy", strategy, "--master", port)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "(deepspeed, precision fp32)" in proc.stderr
    out = in_tmp / strategy
    # accumulation on the step's token mean (no second division by grad_accum), the engine's clipping
    # at 0.5, the recipe's cosine schedule through the wrapped optimizer: the plain run's weights
    assert_close_weights(weights(out), plain, 1e-5)
    # AdamW and clipping would hide a gradient off by a constant factor from the weights; the
    # engine's norm before clipping shows it (dividing by grad_accum again would halve it)
    assert trained_steps(out) == pytest.approx(plain_steps, rel=1e-5)
    # every rank's ZeRO shard is in the atomic checkpoint, listed in its manifest
    step2 = out / "checkpoints" / "step-2"
    files = json.loads((step2 / checkpoint.MANIFEST).read_text())["files"]
    shards = sorted(f for f in files if f.startswith("deepspeed/") and f.endswith("_optim_states.pt"))
    assert len(shards) == 2 and "optimizer.pt" not in files, sorted(files)
    assert checkpoint.verify_checkpoint(step2) is None

    uninterrupted = weights(out)
    shutil.rmtree(out / "final")  # as if killed after the step-2 checkpoint
    shutil.rmtree(out / "checkpoints" / "step-4")
    proc = launch(in_tmp, data, "--num-processes", "2", "--strategy", strategy, "--master", port)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "step-2" in proc.stderr
    assert_close_weights(weights(out), uninterrupted, 1e-6)
