"""Preference losses (DPO, cDPO, robust DPO, IPO, SimPO) by hand, and per-sequence log-probs in both
batch layouts."""

from __future__ import annotations

import math

import pytest
import torch

from finetune.train.collate import collate_flat, collate_padded
from finetune.train.preference_losses import preference_loss, sequence_logps


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_pair_losses_match_hand_computations():
    # pairs: policy chosen/rejected, reference chosen/rejected, response lengths
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -3.0])
    lc, lr = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])
    h = [(-3.0 + 3.5) - (-4.0 + 3.0), (-5.0 + 4.0) - (-2.0 + 3.0)]  # [1.5, -2.0]
    beta, eps = 0.5, 0.2
    got = preference_loss("sigmoid", pc, pr, rc, rr, lc, lr, beta)
    assert got.losses.tolist() == pytest.approx([-logsig(beta * x) for x in h], rel=1e-6)
    assert got.chosen_rewards.tolist() == pytest.approx([0.25, -0.5])
    assert got.rejected_rewards.tolist() == pytest.approx([-0.5, 0.5])
    stats = got.stats()
    assert stats["rewards/margin"].item() == pytest.approx(0.75 - 1.0)
    assert stats["rewards/accuracy"].item() == 1.0  # only the first pair ranks chosen higher
    cdpo = preference_loss("sigmoid", pc, pr, rc, rr, lc, lr, beta, label_smoothing=eps)
    want = [-(1 - eps) * logsig(beta * x) - eps * logsig(-beta * x) for x in h]
    assert cdpo.losses.tolist() == pytest.approx(want, rel=1e-6)
    robust = preference_loss("robust", pc, pr, rc, rr, lc, lr, beta, label_smoothing=eps)
    want = [(-(1 - eps) * logsig(beta * x) + eps * logsig(-beta * x)) / (1 - 2 * eps) for x in h]
    assert robust.losses.tolist() == pytest.approx(want, rel=1e-6)
    ipo = preference_loss("ipo", pc, pr, rc, rr, lc, lr, beta)
    h_mean = [0.5 / 2 - (-1.0) / 1, -1.0 / 4 - 1.0 / 2]  # log-ratios per response token
    assert ipo.losses.tolist() == pytest.approx([(x - 1 / (2 * beta)) ** 2 for x in h_mean], rel=1e-6)
    gamma = 0.3
    simpo = preference_loss("simpo", pc, pr, None, None, lc, lr, beta, label_smoothing=eps, gamma=gamma)
    z = [beta * (-3.0 / 2 - -4.0 / 1) - gamma, beta * (-5.0 / 4 - -2.0 / 2) - gamma]
    assert simpo.losses.tolist() == pytest.approx([-(1 - eps) * logsig(x) - eps * logsig(-x) for x in z], rel=1e-6)
    assert simpo.chosen_rewards.tolist() == pytest.approx([beta * -1.5, beta * -1.25])


def test_sequence_logps_are_the_same_in_flat_and_padded_batches_and_sum_only_trained_tokens():
    torch.manual_seed(0)
    samples = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
               {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
               {"input_ids": [9, 4, 4, 2, 1], "labels": [-100, -100, -100, -100, 1]}]
    vocab = 12
    per_sample = [torch.randn(len(s["input_ids"]), vocab) for s in samples]
    want = []
    for s, logits in zip(samples, per_sample, strict=True):
        logp = torch.log_softmax(logits, -1)
        want.append(sum(logp[t - 1, s["input_ids"][t]].item() for t in range(1, len(s["labels"]))
                        if s["labels"][t] != -100))
    flat = collate_flat(samples)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor(flat.seq_lens))[None]
    sums, counts = sequence_logps(torch.cat(per_sample)[None], flat.labels, ids, 3)
    assert sums.tolist() == pytest.approx(want, abs=1e-5) and counts.tolist() == [2, 2, 1]
    padded = collate_padded(samples, pad_id=0)
    logits = torch.zeros(3, padded.input_ids.shape[1], vocab)
    for i, x in enumerate(per_sample):
        logits[i, :len(x)] = x
    sums, counts = sequence_logps(logits, padded.labels, torch.arange(3)[:, None].expand(3, logits.shape[1]), 3)
    assert sums.tolist() == pytest.approx(want, abs=1e-5) and counts.tolist() == [2, 2, 1]
