"""finetune plot: the figure's subplots, series and labels; a valid PNG; bad metrics files."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.infer.plot import add_plot_arguments, build_figure, choose_metrics, cmd_plot, read_metrics, unique_names
from tests.conftest import write


def metrics_run(path: Path, records: list[dict]) -> Path:
    write(path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return path


def sft_records(scale: float) -> list[dict]:
    train = [{"step": s, "epoch": s / 10, "loss": scale * 3 / s, "lr": 1e-3 * (1 - s / 10), "grad_norm": None if s == 1
              else 1.0, "tokens": 100 * s, "tokens_per_s": 500.0} for s in range(1, 7)]
    evals = [{"step": 3, "eval_loss": scale * 2.0, "eval_ppl": 7.4, "eval_exact_match": 0.25},
             {"step": 6, "eval_loss": scale * 1.5, "eval_ppl": 4.5, "eval_exact_match": 0.5}]
    # Killed after step 4 and resumed from the step-3 checkpoint: steps 4.. are logged again.
    resumed = [{"step": 4, "loss": scale * 0.5, "lr": 4e-4, "tokens": 400, "tokens_per_s": 480.0}]
    return train[:4] + [evals[0]] + resumed + train[4:] + [evals[1]]


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    a = metrics_run(tmp_path / "a" / "sft", sft_records(1.0))
    b = metrics_run(tmp_path / "b" / "sft", sft_records(2.0) + [{"step": 6, "reward": 0.3, "kl": 0.01}])
    return [a, b]


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_plot_arguments(parser)
    return parser.parse_args(argv)


def test_figure_has_one_labelled_subplot_per_metric_and_one_line_per_run(runs):
    read = [read_metrics(str(r)) for r in runs]
    unique_names(read)
    metrics = choose_metrics(read, None)
    assert metrics == ["loss", "eval_loss", "eval_ppl", "eval_exact_match", "reward", "kl", "lr", "grad_norm",
                       "tokens_per_s"]  # step, epoch and the cumulative token count are not plotted
    fig = build_figure(read, metrics)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == metrics
    by_title = {ax.get_title(): ax for ax in axes}
    loss = by_title["loss"]
    assert [line.get_label() for line in loss.get_lines()] == ["a/sft", "b/sft"]  # same dir names told apart
    assert list(loss.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert loss.get_lines()[0].get_ydata()[3] == 0.5  # the resumed run's value for step 4 wins
    assert list(by_title["grad_norm"].get_lines()[0].get_xdata()) == [2, 3, 4, 5, 6]  # None left out
    assert [line.get_label() for line in by_title["reward"].get_lines()] == ["b/sft"]
    assert loss.get_xlabel().startswith("step") and "nats/token" in loss.get_ylabel()
    assert by_title["tokens_per_s"].get_ylabel() == "throughput (tokens/s)"
    assert loss.get_legend() is not None


def test_cli_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert cmd_plot(parse([str(runs[0]), str(runs[1]), "--out", str(out), "--metrics", "loss,eval_loss"])) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (2 * 550, 374)  # two subplots of 5 x 3.4 inches at 110 dpi
    assert len(data) > 10_000 and str(out) in capsys.readouterr().out


def test_one_run_defaults_to_its_dir(runs, capsys):
    assert cmd_plot(parse([str(runs[0])])) == 0
    assert (runs[0] / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("setup", "fragment"), [
    (lambda p: p.mkdir(), "has no metrics.jsonl"),
    (lambda p: write(p / "metrics.jsonl", ""), "no metric records"),
    (lambda p: write(p / "metrics.jsonl", '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n'), "metrics.jsonl:2"),
    (lambda p: None, "no such file"),
])
def test_bad_metrics_files_exit_2_with_one_line(tmp_path, capsys, setup, fragment):
    setup(tmp_path / "run")
    assert cmd_plot(parse([str(tmp_path / "run")])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("finetune: error:") and fragment in err
    assert not (tmp_path / "run" / "plot.png").exists()


def test_unknown_metric_lists_the_present_ones(runs):
    read = [read_metrics(str(runs[0]))]
    with pytest.raises(UserError, match=r"--metrics: rewrd not in .*present: loss, eval_loss"):
        choose_metrics(read, ["loss", "rewrd"])


def test_rounds_are_labelled_as_rounds(tmp_path):
    run = metrics_run(tmp_path / "rs", [{"round": r, "step": r, "reward_mean": 0.1 * r, "eval_pass@1": 0.2 * r}
                                        for r in range(3)])
    fig = build_figure([read_metrics(str(run))], ["eval_pass@1", "reward_mean"])
    assert [ax.get_xlabel() for ax in fig.axes] == ["round", "round"]
    assert fig.axes[0].get_ylabel() == "eval pass@1 (fraction)"
