"""When things go wrong: preemption, corrupt checkpoints, NaNs, disk full, unsafe weights, fuzzed input."""

from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from finetune.errors import DataError, RecipeError, UserError
from finetune.recipe.schema import load_recipe, recipe_from_dict
from finetune.run.launch import run_recipe
from finetune.train import checkpoint, engine
from finetune.train.guards import PREEMPTED_EXIT, StopSignal, TrainingStopped
from tests.conftest import read_metrics, save_tiny_chat_model, tiny_pretrain_recipe, tiny_sft_recipe, write


def final_weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def assert_equal_weights(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_sigterm_checkpoints_exits_75_and_resumes_exactly(in_tmp):
    data = tiny_pretrain_recipe(in_tmp, max_steps=300, log_every=1)
    path = write(in_tmp / "r.yaml", yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "run", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = in_tmp / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT, err[-2000:]
    assert "rerun the same command to resume" in err
    stopped = checkpoint.latest_checkpoint(in_tmp / "out")
    assert stopped is not None and not (in_tmp / "out" / "final").exists()
    assert int(stopped.name.split("-")[1]) < 300

    resumed = subprocess.run([sys.executable, "-m", "finetune", "run", str(path)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {stopped}" in resumed.stderr
    data["run"]["output_dir"] = str(in_tmp / "straight")
    run_recipe(recipe_from_dict(data))
    assert_equal_weights(final_weights(in_tmp / "out"), final_weights(in_tmp / "straight"))


def test_second_signal_aborts_at_once():
    stop = StopSignal()
    try:
        stop._handle(signal.SIGTERM, None)
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)
    finally:
        stop.close()


def test_truncated_newest_checkpoint_is_skipped(in_tmp, capsys):
    data = tiny_pretrain_recipe(in_tmp, max_steps=6, save_every=2, keep_last=3)
    run_recipe(recipe_from_dict(data))
    reference = final_weights(in_tmp / "out")
    newest = in_tmp / "out" / "checkpoints" / "step-4" / "optimizer.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a save cut short by a crash or a full disk
    (in_tmp / "out" / "final").rename(in_tmp / "old-final")
    # As if killed before the last step's checkpoint (a finished run keeps that one too).
    shutil.rmtree(in_tmp / "out" / "checkpoints" / "step-6")
    run_recipe(recipe_from_dict(data))
    err = capsys.readouterr().err
    assert "step-4 is unusable" in err and "optimizer.pt has 100 bytes" in err
    assert "step-2" in err.split("resuming from")[1].splitlines()[0]
    assert_equal_weights(final_weights(in_tmp / "out"), reference)


def nan_on_calls(monkeypatch, bad_calls) -> None:
    real = engine.token_ce_sum
    calls = {"n": 0}

    def fake(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if bad_calls(calls["n"]) else loss

    monkeypatch.setattr(engine, "token_ce_sum", fake)


def test_nan_step_is_skipped_and_counted(in_tmp, monkeypatch):
    nan_on_calls(monkeypatch, lambda n: n == 3)
    run_recipe(recipe_from_dict(tiny_pretrain_recipe(in_tmp, max_steps=5)))
    records = [r for r in read_metrics(in_tmp / "out") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]  # the bad batch did not count as a step
    assert records[-1]["skipped_steps"] == 1 and "skipped_steps" not in records[1]
    assert all(r["loss"] == r["loss"] for r in records if r["step"] != 3)


def test_a_run_of_nans_stops_with_a_hint(in_tmp, monkeypatch):
    nan_on_calls(monkeypatch, lambda n: n >= 2)
    data = tiny_pretrain_recipe(in_tmp, max_steps=10, max_skipped_steps=2)
    with pytest.raises(TrainingStopped, match=r"3 optimizer steps in a row had a non-finite .*optim.lr") as e:
        run_recipe(recipe_from_dict(data))
    assert e.value.exit_code == 3 and "training units [" in str(e.value)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(in_tmp, monkeypatch):
    real = checkpoint._write_main_files
    saves = {"n": 0}

    def full_disk(tmp, *args):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tmp, *args)

    monkeypatch.setattr(checkpoint, "_write_main_files", full_disk)
    with pytest.raises(TrainingStopped, match=r"could not write checkpoint step-4 \(No space left on device\)"):
        run_recipe(recipe_from_dict(tiny_pretrain_recipe(in_tmp, max_steps=6, save_every=2)))
    ckpts = checkpoint.list_checkpoints(in_tmp / "out")
    assert [p.name for p in ckpts] == ["step-2"] and checkpoint.verify_checkpoint(ckpts[0]) is None
    assert not list((in_tmp / "out" / "checkpoints").glob(".tmp-*"))


def test_bin_only_model_is_refused_unless_allowed(in_tmp):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_chat_model(in_tmp / "binmodel")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    data = tiny_sft_recipe(in_tmp, model_dir, max_steps=1)
    with pytest.raises(UserError, match="set model.allow_bin: true"):
        run_recipe(recipe_from_dict(data))
    data["model"]["allow_bin"] = True
    assert (run_recipe(recipe_from_dict(data)) / "model.safetensors").is_file()


def test_bad_rows_can_be_skipped_up_to_a_limit(in_tmp, capsys):
    model_dir = save_tiny_chat_model(in_tmp / "m")
    good = {"messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"}]}
    rows = [good] * 8 + [{"messages": [{"role": "robot", "content": "x"}]}, {"nope": 1}]
    write(in_tmp / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_sft_recipe(in_tmp, model_dir, max_steps=1)
    data["data"]["train"] = [{"path": str(in_tmp / "d.jsonl"), "format": "messages"}]
    data["data"].update(on_bad_row="skip", max_bad_rows=2)
    run_recipe(recipe_from_dict(data))
    err = capsys.readouterr().err
    assert "skipped bad row" in err and "d.jsonl:9" in err and "skipped 2 bad rows" in err
    data["data"]["max_bad_rows"] = 1
    data["run"]["output_dir"] = str(in_tmp / "again")
    with pytest.raises(DataError, match=r"more than 1 bad rows .*d.jsonl:10"):
        run_recipe(recipe_from_dict(data))


# ---------------------------------------------------------------------------------------------- fuzzing

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
sections = st.sampled_from(["model", "tokenizer", "data", "adapter", "trainer", "optim", "run", "launch", "x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(sections, yaml_values, max_size=6) | yaml_values, raw=st.text(max_size=40))
def test_recipe_loader_never_crashes(tmp_path, doc, raw):
    for text in (yaml.safe_dump(doc), raw):
        path = tmp_path / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            load_recipe(path)
        except RecipeError as e:
            assert str(e) and "\n" not in str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.text(max_size=30) | st.sampled_from(
    ["run.max_steps=3", "optim.lr=x", "run.=1", "=", "data.train.9.path=a", "launch.nnodes=-1",
     "model.init_config.a.b=1", "adapter.r=[1,2]", "run.precision=bf16"]), max_size=4))
def test_overrides_never_crash(tmp_path, overrides):
    base = tiny_pretrain_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(base))
    try:
        load_recipe(path, overrides)
    except RecipeError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_flat_collation_loses_no_token_and_keeps_boundaries(lengths):
    from finetune.train.collate import collate_flat

    samples, next_id = [], 1
    for n in lengths:
        ids = list(range(next_id, next_id + n))
        next_id += n
        samples.append({"input_ids": ids, "labels": ids})
    batch = collate_flat(samples)
    assert batch.input_ids.flatten().tolist() == list(range(1, next_id))
    starts = batch.cu_seq_lens.tolist()
    assert starts == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    pos = batch.position_ids.flatten().tolist()
    assert [pos[s] for s in starts[:-1]] == [0] * len(lengths)
    labels = batch.labels.flatten().tolist()
    assert [labels[s] for s in starts[:-1]] == [-100] * len(lengths)  # never predicted across a boundary
