"""`make gpu-check`'s script (finetune.run.gpu_check): its --cpu mode runs every check on tiny shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune.run import gpu_check
from tests.conftest import ROOT


@pytest.mark.slow
def test_cpu_mode_runs_every_check_and_writes_the_table(tmp_path):
    out = tmp_path / "gpu-check.md"
    out.write_text("# kept\n\n<!-- gpu-check results -->\nold\n<!-- /gpu-check results -->\ntail\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "finetune.run.gpu_check", "--cpu", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# kept\n") and text.endswith("tail\n") and "old" not in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    seen = {(r[0].strip("| "), r[2]) for r in rows}
    for check in ("attention kernel", "packed vs padded (bf16)", "compile", "ppo (2 LoRA updates)", "bench",
                  "sampling (shared prefill)"):
        assert (check, "PASS") in seen, (check, rows)
    assert len([r for r in rows if r[0] == "| attention kernel"]) == 3  # fp32-master, LoRA, QLoRA
    assert {r[2] for r in rows if r[0] == "| peak memory"} == {"SKIP"}  # no CUDA: trained, not measured
    assert any(r[0] == "| pytest -m gpu" for r in rows)


@pytest.mark.parametrize("names, kernel", [
    ({"aten::_scaled_dot_product_attention_math", "aten::softmax"}, "math"),
    ({"aten::bmm", "aten::_softmax"}, "math"),  # attention spelled out in matmuls: no fused kernel at all
    ({"aten::_flash_attention_forward", "aten::_flash_attention_backward"}, "flash"),
    ({"aten::_scaled_dot_product_flash_attention_for_cpu"}, "flash (cpu)"),
    ({"aten::_scaled_dot_product_efficient_attention"}, "mem-efficient"),
])
def test_kernel_classification(names, kernel):
    assert gpu_check.kernel_of(names, cuda=True) == kernel


def test_results_section_is_replaced_or_appended(tmp_path):
    doc = tmp_path / "d.md"
    gpu_check.write_results(doc, "first")
    gpu_check.write_results(doc, "second")
    text = doc.read_text()
    assert text.count(gpu_check.MARK_BEGIN) == 1 and "second" in text and "first" not in text


def test_gpu_mode_refuses_without_cuda(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert gpu_check.main([]) == 2
    assert "--cpu" in capsys.readouterr().err
