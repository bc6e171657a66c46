"""Hand-computed checks of finetune.train.losses, and chunked CE against the plain path."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from finetune.train.losses import (
    chunked_linear_ce_sum,
    count_trained_tokens,
    gather_logprobs,
    logit_transform_from_config,
    masked_mean,
    masked_sum,
    token_ce_sum,
)


def test_token_ce_sum_shifts_and_masks_by_hand():
    # vocab 2; logits at t predict labels at t + 1; labels[0] is never a target.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[1, 0, -100]])
    # Only position 0 predicting labels[1] = 0: p = 1/2 -> -log(1/2).
    assert token_ce_sum(logits, labels).item() == pytest.approx(math.log(2.0))
    labels = torch.tensor([[1, 1, 0]])
    # + position 1 predicting 0 with p(0) = 3/4.
    expected = math.log(2.0) - math.log(0.75)
    assert token_ce_sum(logits, labels).item() == pytest.approx(expected)


def test_token_ce_sum_is_fp32_and_zero_when_all_masked():
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16, requires_grad=True)
    loss = token_ce_sum(logits, torch.full((2, 4), -100))
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()  # an all-masked micro-batch must not break backward
    assert logits.grad.abs().sum() == 0


def test_count_trained_tokens_follows_the_shift():
    assert count_trained_tokens(torch.tensor([[-100, 5, -100, 7]])) == 2
    assert count_trained_tokens(torch.tensor([[5, -100, -100]])) == 0  # labels[0] is no target
    assert count_trained_tokens(torch.tensor([[1, 2], [3, 4]])) == 2


def _plain_reference(hidden, weight, labels, bias=None, scale=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias) * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return token_ce_sum(logits, labels)


def _random_case(seed, with_bias):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, 16, generator=gen, dtype=torch.float64).float()
    weight = torch.randn(37, 16, generator=gen).mul(0.3)
    bias = torch.randn(37, generator=gen) if with_bias else None
    labels = torch.randint(0, 37, (3, 11), generator=gen)
    labels[0, 2:7] = -100
    labels[1] = -100  # a whole row, hence whole chunks, masked
    return hidden, weight, bias, labels


@pytest.mark.parametrize(
    "with_bias,scale,softcap,chunk",
    [(False, 1.0, None, 4), (False, 1.0, None, 1000), (True, 0.5, None, 3), (False, 1.0, 2.0, 5)],
)
def test_chunked_ce_equals_plain_values_and_gradients(with_bias, scale, softcap, chunk):
    hidden, weight, bias, labels = _random_case(0, with_bias)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]

    ours = chunked_linear_ce_sum(*leaves[:2], labels, chunk_size=chunk,
                                 bias=leaves[2] if with_bias else None, scale=scale, softcap=softcap)
    ref = _plain_reference(*ref_leaves[:2], labels, bias=ref_leaves[2] if with_bias else None,
                           scale=scale, softcap=softcap)
    (2.5 * ours).backward()  # a non-unit upstream gradient must scale the stored gradients
    (2.5 * ref).backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    assert leaves[0].grad[1].abs().sum() == 0  # the masked row gets no gradient


def test_chunked_ce_all_masked_and_no_grad_and_frozen_weight():
    hidden, weight, _, labels = _random_case(1, False)
    h = hidden.clone().requires_grad_()
    zero = chunked_linear_ce_sum(h, weight, torch.full_like(labels, -100))
    zero.backward()
    assert zero.item() == 0.0 and h.grad.abs().sum() == 0
    with torch.no_grad():
        assert chunked_linear_ce_sum(hidden, weight, labels, chunk_size=4).item() == pytest.approx(
            _plain_reference(hidden, weight, labels).item(), rel=1e-6)
    # Frozen lm_head (LoRA): only the hidden states get a gradient.
    h = hidden.clone().requires_grad_()
    chunked_linear_ce_sum(h, weight, labels, chunk_size=4).backward()
    assert weight.grad is None and h.grad is not None


def test_chunked_ce_bf16_close_to_plain():
    hidden, weight, _, labels = _random_case(2, False)
    ours = chunked_linear_ce_sum(hidden.bfloat16(), weight.bfloat16(), labels, chunk_size=4)
    ref = _plain_reference(hidden, weight, labels)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=2e-2)


def test_logit_transform_from_config():
    assert logit_transform_from_config(SimpleNamespace()) == (1.0, None)
    assert logit_transform_from_config(SimpleNamespace(logit_scale=0.25)) == (0.25, None)
    assert logit_transform_from_config(SimpleNamespace(logits_scaling=4.0)) == (0.25, None)
    assert logit_transform_from_config(SimpleNamespace(final_logit_softcapping=30.0)) == (1.0, 30.0)


def test_masked_sum_and_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_sum(x, mask).item() == 9.0  # the NaN outside the mask does not leak
    assert masked_mean(x, mask).item() == 3.0
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 6.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 6.0]))
    empty = torch.zeros_like(mask)
    assert masked_mean(x, empty).item() == 0.0
    torch.testing.assert_close(masked_mean(x, torch.tensor([[1, 0, 0], [0, 0, 0]]), dim=1),
                               torch.tensor([1.0, 0.0]))


def test_gather_logprobs_by_hand():
    logits = torch.tensor([[[math.log(1.0), math.log(3.0)], [2.0, 0.0]]], dtype=torch.bfloat16)
    tokens = torch.tensor([[1, 0]])
    out = gather_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    bf = logits.float()[0]  # the bf16-rounded inputs, computed by hand
    expected = [math.log(math.exp(bf[0, 1]) / (math.exp(bf[0, 0]) + math.exp(bf[0, 1]))),
                -math.log(1 + math.exp(-2.0))]
    torch.testing.assert_close(out[0], torch.tensor(expected), atol=1e-6, rtol=0)
    # temperature 2: logits [2, 0] -> [1, 0]
    hot = gather_logprobs(torch.tensor([[2.0, 0.0]]), torch.tensor([0]), temperature=2.0)
    assert hot.item() == pytest.approx(-math.log(1 + math.exp(-1.0)))
    # -100 ids do not raise (callers mask those positions)
    assert gather_logprobs(torch.zeros(1, 3, 4), torch.tensor([[-100, 1, 2]])).shape == (1, 3)
