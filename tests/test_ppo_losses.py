"""PPO maths in finetune.train.losses, against plain loops and hand-computed values."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from finetune.train.losses import (
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae_advantages,
    kl_penalty,
    masked_whiten,
    per_token_rewards,
)


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """GAE of one sequence, written the obvious way."""
    n, adv, running = len(rewards), [0.0] * len(rewards), 0.0
    for t in reversed(range(n)):
        next_value = values[t + 1] if t + 1 < n else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv


@pytest.mark.parametrize("gamma", [1.0, 0.99])
@pytest.mark.parametrize("lam", [0.0, 0.95, 1.0])
def test_gae_matches_a_per_sequence_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7]
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor(lengths)[:, None]).long()
    adv, returns = gae_advantages(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = gae_loop(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        torch.testing.assert_close(adv[i, :n], torch.tensor(expected), atol=1e-5, rtol=1e-5)
        assert adv[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0
    torch.testing.assert_close(returns, (adv + values) * mask)
    if lam == 0.0:  # one-step TD error
        nxt = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros(4, 1)], 1)
        torch.testing.assert_close(adv, (rewards + gamma * nxt - values) * mask)
    # Whatever the values and rewards hold at padded positions, nothing changes.
    noise = torch.randn(4, 7, generator=g) * 100 * (1 - mask)
    adv2, returns2 = gae_advantages(rewards + noise, values + noise, mask, gamma, lam)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(returns2, returns)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage_with_gradient_minus_a_over_n():
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 5, generator=g)
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    n = int(mask.sum())
    logprobs = old.clone().requires_grad_()
    out = clipped_policy_loss(logprobs, old, adv, mask, clip=0.2)
    (out.loss_sum / n).backward()
    assert (out.loss_sum / n).item() == pytest.approx(-(adv * mask).sum().item() / n, abs=1e-6)
    torch.testing.assert_close(logprobs.grad, -adv * mask / n)
    assert out.clipped.item() == 0 and out.ratio_sum.item() == pytest.approx(n)
    assert out.approx_kl_sum.item() == 0


@pytest.mark.parametrize(("ratio", "advantage", "engaged"), [
    (0.5, 1.0, False), (1.0, 1.0, False), (1.5, 1.0, True),
    (0.5, -1.0, True), (1.0, -1.0, False), (1.5, -1.0, False),
])
def test_policy_clipping_truth_table(ratio, advantage, engaged):
    old = torch.tensor([[-1.0]])
    logprobs = (old + math.log(ratio)).requires_grad_()
    out = clipped_policy_loss(logprobs, old, torch.tensor([[advantage]]), torch.ones(1, 1), clip=0.2)
    out.loss_sum.backward()
    assert out.clipped.item() == float(engaged)
    if engaged:  # the clipped term is the larger loss: constant in the ratio
        assert logprobs.grad.item() == 0.0
        assert out.loss_sum.item() == pytest.approx(-advantage * min(max(ratio, 0.8), 1.2))
    else:  # d(-A * ratio)/d logprob = -A * ratio
        assert logprobs.grad.item() == pytest.approx(-advantage * ratio)
        assert out.loss_sum.item() == pytest.approx(-advantage * ratio)


def test_log_ratio_is_clamped_so_a_far_off_policy_token_stays_finite():
    out = clipped_policy_loss(torch.tensor([[200.0]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert math.isfinite(out.loss_sum.item()) and out.loss_sum.item() == pytest.approx(math.exp(20.0), rel=1e-5)


@pytest.mark.parametrize(("value", "ret", "engaged"), [
    (0.5, 1.0, True), (0.5, -1.0, False), (-0.5, 1.0, False), (-0.5, -1.0, True), (0.0, 1.0, False), (0.1, 1.0, False),
])
def test_value_clipping_truth_table(value, ret, engaged):
    old = torch.tensor([[0.0]])
    values = torch.tensor([[value]], requires_grad=True)
    out = clipped_value_loss(values, old, torch.tensor([[ret]]), torch.ones(1, 1), clip=0.2)
    out.loss_sum.backward()
    assert out.clipped.item() == float(engaged)
    if engaged:
        clipped = max(min(value, 0.2), -0.2)
        assert values.grad.item() == 0.0
        assert out.loss_sum.item() == pytest.approx(0.5 * (clipped - ret) ** 2)
    else:
        assert values.grad.item() == pytest.approx(value - ret)
        assert out.loss_sum.item() == pytest.approx(0.5 * (value - ret) ** 2)


def test_kl_estimators_by_hand():
    p, q = torch.tensor([math.log(0.5), math.log(0.25)]), torch.tensor([math.log(0.25), math.log(0.5)])
    torch.testing.assert_close(kl_penalty(p, q, "k1"), torch.tensor([math.log(2.0), -math.log(2.0)]))
    # k3 = (r - 1) - log r with r = p_ref / p: r = 0.5 and r = 2
    torch.testing.assert_close(kl_penalty(p, q, "k3"), torch.tensor([-0.5 + math.log(2.0), 1.0 - math.log(2.0)]))
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1000, generator=g) * 3, torch.randn(1000, generator=g) * 3
    assert (kl_penalty(a, b, "k3") >= 0).all()
    assert kl_penalty(a, a, "k1").abs().max() == 0 and kl_penalty(a, a, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(a, b, "k2")


def test_whiten_over_the_mask_and_padding_stays_zero():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g) * 5 + 3
    mask = (torch.arange(6)[None] < torch.tensor([6, 2, 4, 1])[:, None]).long()
    w = masked_whiten(x, mask)
    kept = w[mask.bool()]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert kept.std().item() == pytest.approx(1.0, abs=1e-4)  # unbiased, as the variance
    assert w[~mask.bool()].abs().sum() == 0
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert unshifted[mask.bool()].mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-4)
    # A lone valid entry has no variance: it is left as it is, not zeroed or blown up.
    lone = torch.zeros_like(mask)
    lone[0, 0] = 1
    assert masked_whiten(x, lone)[0, 0].item() == x[0, 0].item()
    assert masked_whiten(x, torch.zeros_like(mask)).abs().sum() == 0


def test_whiten_with_all_reduce_uses_the_statistics_of_every_process():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 5, generator=g)
    mask = (torch.arange(5)[None] < torch.tensor([5, 1, 3, 2, 4, 5])[:, None]).long()
    whole = masked_whiten(x, mask)
    # Two "processes" holding three rows each, summing their statistics through a barrier.
    barrier, shared, out = threading.Barrier(2), [None, None], [None, None]

    def run(rank: int) -> None:
        def all_reduce(t):
            shared[rank] = t
            barrier.wait()
            total = shared[0] + shared[1]
            barrier.wait()
            return total

        rows = slice(3 * rank, 3 * rank + 3)
        out[rank] = masked_whiten(x[rows], mask[rows], all_reduce=all_reduce)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.testing.assert_close(torch.cat(out), whole)


def test_score_is_placed_once_at_the_last_valid_token():
    mask = (torch.arange(5)[None] < torch.tensor([3, 5, 1])[:, None]).long()
    kl = torch.randn(3, 5)
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards = per_token_rewards(scores, kl, mask, beta=0.0)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 4], expected[2, 0] = 2.0, -1.0, 0.5
    assert torch.equal(rewards, expected)
    with_kl = per_token_rewards(scores, kl, mask, beta=0.1)
    torch.testing.assert_close(with_kl + 0.1 * kl * mask, expected)


def test_entropy_by_hand():
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    assert entropy_from_logits(torch.tensor([[0.0, -1e9]])).item() == pytest.approx(0.0, abs=1e-6)
    # temperature 2 on logits [log 4, 0]: probabilities [2/3, 1/3]
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert entropy_from_logits(torch.tensor([[math.log(4.0), 0.0]]), temperature=2.0).item() == pytest.approx(h)


@pytest.mark.parametrize(("kl", "n", "horizon"), [
    (6.0, 16, 100),    # KL 20% above target: error 0.2, the clip's edge
    (5.5, 8, 40),      # error 0.1, inside the clip
    (50.0, 16, 100),   # error 9 clipped to 0.2
    (0.0, 16, 100),    # error -1 clipped to -0.2
    (4.0, 64, 64),     # error -0.2 with n == horizon: beta falls 20% in one update
])
def test_adaptive_kl_controller_against_the_ziegler_rule_by_hand(kl, n, horizon):
    from finetune.trainers.ppo import KLController

    target, beta = 5.0, 0.1
    ctl = KLController(beta, target, horizon)
    ctl.update(kl, n)
    error = {6.0: 0.2, 5.5: 0.1, 50.0: 0.2, 0.0: -0.2, 4.0: -0.2}[kl]  # clip(kl / target - 1, -0.2, 0.2)
    assert ctl.beta == pytest.approx(beta * (1 + error * n / horizon), rel=1e-12)
    fixed = KLController(beta)  # no target: beta never moves
    fixed.update(kl, n)
    assert fixed.beta == beta


def test_adaptive_kl_controller_compounds_over_updates():
    from finetune.trainers.ppo import KLController

    ctl = KLController(0.05, target=2.0, horizon=1000)
    for _ in range(3):  # KL 3 is 50% above target: +0.2 (clipped) x 100 / 1000 per update
        ctl.update(3.0, 100)
    assert ctl.beta == pytest.approx(0.05 * 1.02 ** 3, rel=1e-12)
