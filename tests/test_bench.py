"""CPU smoke test of the benchmark harness (finetune.train.bench) on a tiny shape, and its arithmetic."""

from __future__ import annotations

import json

import pytest

from finetune.train import bench

TINY = bench.Options(steps=2, warmup=1, batch_size=4, min_length=8, max_length=32)


def test_synthetic_rows_are_deterministic_and_in_range():
    rows = bench.synthetic_rows(50, 8, 32, 512, seed=3)
    assert rows == bench.synthetic_rows(50, 8, 32, 512, seed=3)
    assert all(8 <= len(r["input_ids"]) <= 32 and r["labels"] == r["input_ids"] for r in rows)
    assert all(0 <= t < 512 for r in rows for t in r["input_ids"])


def test_model_flops_by_hand():
    shape = {"hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
             "intermediate_size": 8, "vocab_size": 10}
    # q 4x4 + k,v 4x2 each + o 4x4 + mlp 3 x 4x8 = 16 + 16 + 16 + 96 = 144; head 10x4 = 40
    n = 144 + 40
    attention = 6 * 1 * 2 * 2 * (3 * 3 + 5 * 5)
    assert bench.model_flops(shape, False, 8, 34) == 6 * n * 8 + attention
    lora = 1 * 2 * ((4 + 4) + (4 + 2) * 2 + (4 + 4) + (4 + 8) * 2 + (8 + 4))
    assert bench.model_flops(shape, True, 8, 34, lora_r=2) == 4 * n * 8 + 6 * lora * 8 + attention


def test_issue_shapes_flops_per_token():
    # Qwen2.5-0.5B shape: ~494M matmul parameters (head included) -> 2.96 GFLOP/token before attention.
    per_token = bench.model_flops(bench.SHAPES["qwen0.5b"], False, 1, 0)
    assert 2.9e9 < per_token < 3.0e9
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops("cpu") is None and bench.peak_flops("x", 100) == 100e12


def test_suites_hold_the_issue_runs():
    names = [(s.system, s.name) for s in bench.suite("issue", ["qwen0.5b", "llama1b"])]
    assert ("trl", "TRL full padded") in names and ("trl", "TRL LoRA padded") in names
    assert ("finetune", "fast path, fp32 master") in names and ("finetune", "LoRA fast path") in names
    ablation = bench.suite("ablation", ["qwen0.5b"])
    assert ablation[0].layout == "padded" and not ablation[0].chunked_ce
    assert ablation[-1] == bench.RunSpec(ablation[-1].name, shape="qwen0.5b")  # all switches on = the fast path


def test_tiny_runs_through_the_engine_and_agree_on_the_loss(capsys, tmp_path):
    specs = [s for s in bench.suite("tiny", ["tiny"]) if s.system == "finetune"][:2]
    out = tmp_path / "bench.jsonl"
    results = bench.run_all(specs, TINY, out)
    assert all("error" not in r for r in results), results
    for r in results:
        assert r["tokens_per_s"] > 0 and r["tokens"] > 0 and r["step_s"] > 0
    plain, fast = results[0], results[1]
    # Same rows, same order, same init: the fast path's last-step loss equals the plain path's.
    assert plain["tokens"] == fast["tokens"]
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-4)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(specs) and lines[0]["torch"] and lines[0]["device"] == "cpu"
    table = bench.table(results)
    assert "ours full: fast path (no compile)" in table


def test_exactness_check_on_cpu():
    result = bench.exactness("tiny", TINY)
    assert result["loss_rel_err_fast"] < 1e-5 and result["grad_rel_diff_fast_vs_plain"] < 1e-5


def test_trl_side_runs_when_trl_imports():
    if bench.trl_available() is None:
        pytest.skip("trl/datasets not importable")
    spec = bench.RunSpec("TRL full padded", "trl", "tiny", policy="fp32", layout="padded")
    rows = bench.synthetic_rows(32, 8, 32, 512, seed=0)
    result = bench.run_spec(spec, TINY, rows)
    assert "error" not in result, result
    assert result["tokens_per_s"] > 0 and result["loss"] is not None
    assert result["chunked_ce"] is None  # our switches do not describe TRL's runs


def test_cli_entry_prints_json_lines_a_table_and_profiles(capsys, tmp_path):
    assert bench.main(["--suite", "tiny", "--no-trl", "--only", "plain", "--steps", "1", "--warmup", "1",
                       "--batch-size", "2", "--min-length", "8", "--max-length", "16",
                       "--profile", str(tmp_path / "prof")]) == 0
    out = capsys.readouterr().out
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert "versions" in records[0] and records[1]["run"] == "plain padded"
    assert "| shape | run |" in out
    (table,) = (tmp_path / "prof").glob("tiny-ours-plain_padded.txt")
    assert "aten::" in table.read_text()
