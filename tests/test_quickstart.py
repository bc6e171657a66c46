"""The quickstart story end to end (slow, several minutes on one core): recipes/quickstart.yaml runs
pretrain -> SFT -> rejection-sampling SFT (LoRA) -> merge -> PPO on the tiny synthetic task and
scores every stage on the same 300 held-out prompts. One run serves every test here."""

from __future__ import annotations

import json

import pytest
import torch

from finetune.recipe.schema import load_recipe
from finetune.run.launch import run_recipe
from finetune.run.pipeline import run_pipeline
from tests.conftest import ROOT, read_metrics

pytestmark = pytest.mark.slow  # make test's `--dist loadfile` keeps this file on one worker

# Measured on 2 CPU cores (recipes/quickstart.yaml, seed 42): rs held-out pass@1 0.19 -> 0.31 and
# its sampled pass rate on the training prompts 0.089 -> 0.123 (round 1 -> 3), 2026-11-30 with the
# SFT stage's 18 epochs; before that day's numerics changes, with 12 epochs, three runs gave
# 0.17 -> 0.32, 0.17 -> 0.37, 0.12 -> 0.32 and 0.064 -> 0.109, 0.065 -> 0.111, 0.068 -> 0.096.
# ppo training score 0.171 -> 0.213 and 0.150 -> 0.180 (frozen for the critic's warm-up -> last 5
# of 12 updates), 0.171 -> 0.200 (of 10).
RS_HELD_OUT_GAIN = 0.05   # 300 prompts: standard error of a difference ~0.04
RS_TRAIN_GAIN = 0.01      # 12,240 samples per round: standard error ~0.004 (measured +0.028 to +0.046)
# The story's 10 PPO updates raised the training score by +0.03 to +0.04 (above, at 512 rollouts per
# update; 256 and then 2 epochs per update since 2026-11-30, to cut the stage's time to a quarter:
# 0.125 -> 0.147, KL 0.03-0.06 over the last 3 updates), but the rollouts put a standard error of
# ~0.014 (512) to ~0.02 (256) on that difference: no threshold separates it from a frozen policy
# without failing one real run in ten. So the stage is held to
# what it must show for sure (the warm-up froze the policy, then it moved, KL-bounded, without
# losing held-out accuracy), and PPO's learning to the toy tasks of test_ppo.py (emit-the-target
# 0.06 -> >= 0.9, copy-the-token, negated advantages make the reward fall, the bandit's optimum).
PPO_HELD_OUT_LOSS = 0.08  # a no-collapse bound: measured -0.01, +0.03 and -0.017; a paired difference's
                          # standard error on 300 prompts is ~0.02-0.03


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def story(tmp_path_factory, monkeypatch_module, both_cores_once_the_other_worker_is_done):
    monkeypatch_module.chdir(ROOT)  # the recipes use repo-relative data paths
    out = tmp_path_factory.mktemp("story") / "quickstart"
    root = run_pipeline(ROOT / "recipes/quickstart.yaml", [f"pipeline.output_dir={out}"])
    return root, {r["stage"]: r["accuracy"] for r in json.loads((root / "pipeline.json").read_text())}


def test_pretraining_learns_the_language(story):
    root, _ = story
    evals = [r for r in read_metrics(root / "pretrain") if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 400
    assert evals[-1]["eval_loss"] < 0.3 * evals[0]["eval_loss"]


def test_every_stage_is_scored_and_drawn(story):
    root, acc = story
    assert list(acc) == ["pretrain", "sft", "rs", "merged", "ppo"]
    # The pretrained model does not know the chat format; SFT on half the demonstrations teaches
    # it and leaves room for the later stages. Measured 0.19 (twice: 1 and 2 threads; 300 prompts put
    # a standard error of ~0.023 on it); its 18 epochs sit on a steep part of the curve (12 epochs:
    # 0.07, 16: 0.13, 20: 0.29), so the floor is well below the measured value.
    assert acc["pretrain"] < 0.02 and acc["sft"] >= 0.10, acc
    assert acc["merged"] == acc["rs"]  # merged == adapter: the same greedy replies
    assert (root / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "rs" / "final" / "adapter_config.json").is_file()
    for stage in ("pretrain", "sft", "ppo"):
        assert (root / stage / "final" / "config.json").is_file()


def test_rejection_sampling_raises_held_out_pass_at_1(story):
    root, acc = story
    rounds = [r for r in read_metrics(root / "rs") if "round" in r]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    # Each round samples from the previous round's model: the verified pass rate of the samples on
    # the training prompts rises, and the skill (restating the question) carries over to held-out.
    assert rounds[3]["reward_mean"] >= rounds[1]["reward_mean"] + RS_TRAIN_GAIN, rounds
    assert rounds[3]["eval_pass@1"] >= rounds[0]["eval_pass@1"] + RS_HELD_OUT_GAIN, rounds
    # The trainer's and the pipeline's evals agree (metrics.jsonl keeps 6 significant digits).
    assert acc["rs"] == pytest.approx(rounds[3]["eval_pass@1"], abs=1e-4)


def test_ppo_moves_the_policy_after_the_warm_up_with_kl_bounded(story):
    from safetensors.torch import load_file

    root, acc = story
    updates = [r for r in read_metrics(root / "ppo") if "score" in r]
    assert len(updates) == 10, updates
    # Critic warm-up (2 updates): the rollouts of updates 1-3 come from the unchanged policy, so
    # they are sampled from the reference itself (KL 0 up to float rounding) ...
    assert all(abs(r["kl"]) < 1e-3 for r in updates[:3]), updates
    # ... then the policy moves away from it, and the KL penalty keeps it close.
    assert all(r["kl"] > 0.01 for r in updates[-3:]) and max(r["kl"] for r in updates) < 1.0, updates
    merged = load_file(root / "merged" / "model.safetensors")
    ppo = load_file(root / "ppo" / "final" / "model.safetensors")
    assert merged.keys() == ppo.keys() and any(not torch.equal(merged[k], ppo[k]) for k in merged)
    assert acc["ppo"] >= acc["merged"] - PPO_HELD_OUT_LOSS, acc


def test_lora_sft_learns_on_the_pretrained_model(story, tmp_path):
    # recipes/sft_lora_cpu.yaml as the README runs it, on the story's pretrained model. Its merge is
    # not scored again here: the story's rs stage is a LoRA adapter too, merged == rs above holds on
    # the 300 held-out prompts at a score that is not 0, and test_merge.py compares merged and
    # adapter logits.
    root, _ = story
    out = tmp_path / "lora"
    run_recipe(load_recipe(ROOT / "recipes/sft_lora_cpu.yaml",
                           [f"model.name={root / 'pretrain' / 'final'}", f"run.output_dir={out}"]))
    evals = [r for r in read_metrics(out) if "eval_exact_match" in r]
    assert evals[-1]["eval_exact_match"] >= evals[0]["eval_exact_match"] + 0.25, evals
    assert (out / "final" / "adapter_config.json").is_file()
