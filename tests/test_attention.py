"""A packed sample computes exactly what it computes alone (tiny llama / qwen2 with GQA, fp32, CPU).

Reference: each sample alone through transformers' own sdpa. Negative controls show the
comparisons can fail: attention allowed across samples, and labels not masked at boundaries.
"""

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.train.attention import (
    ATTENTION_NAME,
    cu_seq_lens_from_position_ids,
    enable_packed_attention,
    packed_attention_forward,
)
from finetune.train.collate import collate_flat, collate_padded
from finetune.train.losses import token_ce_sum

KINDS = ["llama", "qwen2"]
ATOL = 1e-4


@functools.cache
def tiny_model(kind: str, window: int | None = None):
    torch.manual_seed(0)
    extra = {} if window is None else {"use_sliding_window": True, "sliding_window": window,
                                       "max_window_layers": 0}
    cfg = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=100, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


def make_samples(lengths=(5, 9, 3, 7), seed=1):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(0, 100, (n,), generator=gen).tolist()
        labels = [t if i % 3 else -100 for i, t in enumerate(ids)]  # some untrained tokens
        samples.append({"input_ids": ids, "labels": labels})
    return samples


def alone_logits(model, samples):
    """Each sample on its own, through transformers' sdpa (independent of our attention)."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        return [model(torch.tensor([s["input_ids"]]), use_cache=False).logits[0] for s in samples]


def flat_slices(logits, batch):
    cu = batch.cu_seq_lens.tolist()
    return [logits[0, a:b] for a, b in zip(cu[:-1], cu[1:], strict=True)]


def max_diff(xs, ys):
    return max((x - y).abs().max().item() for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_packed_and_padded_logits_equal_alone(kind):
    model, samples = tiny_model(kind), make_samples()
    reference = alone_logits(model, samples)
    enable_packed_attention(model)
    assert model.config._attn_implementation == ATTENTION_NAME
    flat, padded = collate_flat(samples), collate_padded(samples, pad_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        flat_logits = model(**flat.model_inputs()).logits
        padded_logits = model(**padded.model_inputs()).logits
    assert max_diff(flat_slices(flat_logits, flat), reference) < ATOL
    assert max_diff([padded_logits[i, :n] for i, n in enumerate(padded.seq_lens)], reference) < ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_flat_loss_equals_padded_and_sum_alone(kind):
    model, samples = enable_packed_attention(tiny_model(kind)), make_samples(seed=2)
    flat, padded = collate_flat(samples), collate_padded(samples, pad_id=0)
    with torch.no_grad():
        flat_loss = token_ce_sum(model(**flat.model_inputs()).logits, flat.labels)
        padded_loss = token_ce_sum(model(**padded.model_inputs()).logits, padded.labels)
        alone = sum(token_ce_sum(model(**b.model_inputs()).logits, b.labels)
                    for b in (collate_flat([s]) for s in samples))
    assert flat_loss.item() == pytest.approx(alone.item(), rel=1e-5)
    assert padded_loss.item() == pytest.approx(alone.item(), rel=1e-5)


def test_negative_controls_attention_across_samples_and_unmasked_boundaries():
    model, samples = tiny_model("llama"), make_samples()
    reference = alone_logits(model, samples)
    flat = collate_flat(samples)
    # 1. Our attention told the row is one sequence (position_ids still restart): samples leak.
    enable_packed_attention(model)
    one_segment = flat.model_inputs() | {"cu_seq_lens_q": torch.tensor([0, flat.num_tokens],
                                                                        dtype=torch.int32)}
    # 2. Plain sdpa handed an all-ones attention_mask, as a naive padded collator would do;
    # transformers then stops reading sample boundaries from position_ids.
    naive = flat.model_inputs() | {"attention_mask": torch.ones_like(flat.input_ids)}
    with torch.no_grad():
        leaked = model(**one_segment).logits
        model.set_attn_implementation("sdpa")
        crossed = model(**naive).logits
    for logits in (leaked, crossed):
        slices = flat_slices(logits, flat)
        assert (slices[0] - reference[0]).abs().max() < ATOL  # the first sample sees no other
        assert (slices[1] - reference[1]).abs().max() > 1e-2  # the second one does
    # 3. Without masking each sample's first label, the flat loss gains cross-sample terms.
    enable_packed_attention(model)
    raw_labels = torch.tensor([[t for s in samples for t in s["labels"][:1] + s["labels"][1:]]])
    raw_labels[0, 0] = -100
    raw_labels[0, flat.cu_seq_lens[1:-1].long()] = 7  # train the boundary tokens
    with torch.no_grad():
        logits = model(**flat.model_inputs()).logits
    assert token_ce_sum(logits, raw_labels) > token_ce_sum(logits, flat.labels) + 1e-3


def test_flat_and_padded_gradients_agree():
    model = enable_packed_attention(tiny_model("llama"))
    samples = make_samples(seed=3)
    grads = []
    for batch in (collate_flat(samples), collate_padded(samples, pad_id=0)):
        model.zero_grad()
        token_ce_sum(model(**batch.model_inputs()).logits, batch.labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_sliding_window_respected_in_packed_rows():
    model, samples = tiny_model("qwen2", window=3), make_samples(lengths=(6, 8, 2))
    reference = alone_logits(model, samples)
    # the window changes the outputs of a long sample, so matching it below means something
    full = alone_logits(tiny_model("qwen2"), samples[1:2])
    assert (full[0] - reference[1]).abs().max() > 1e-3
    flat = collate_flat(samples)
    with torch.no_grad():
        logits = enable_packed_attention(model)(**flat.model_inputs()).logits
    assert max_diff(flat_slices(logits, flat), reference) < ATOL


def test_generation_unchanged():
    model = tiny_model("llama")
    prompt = torch.tensor([make_samples(lengths=(6,))[0]["input_ids"]])
    model.set_attn_implementation("sdpa")
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(enable_packed_attention(model).generate(prompt, max_new_tokens=5,
                                                               do_sample=False), expected)


def test_cu_seq_lens_from_position_ids():
    assert cu_seq_lens_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]])).tolist() == [0, 3, 5, 6]
    assert cu_seq_lens_from_position_ids(torch.tensor([[0, 1], [0, 1]])).tolist() == [0, 2, 4]


@pytest.mark.parametrize("causal", [True, False])
def test_attention_function_matches_per_sample_sdpa(causal):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 12, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 6, 12], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = causal, 2
    out, _ = packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=causal, enable_gqa=True)
        torch.testing.assert_close(out[0, a:b], ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (PyTorch FlashAttention varlen)")
def test_flash_varlen_matches_fallback_on_gpu():
    from finetune.train.attention import _can_use_flash, _per_sample_sdpa

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, 300, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
               for h in (8, 2, 2))
    cu = torch.tensor([0, 100, 101, 300], dtype=torch.int32, device="cuda")
    assert _can_use_flash(q.device, q.dtype, 64, 0.0, None)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=199)
    ref = _per_sample_sdpa(q.float(), k.float(), v.float(), cu, True, None, 0.0, None)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# Which dtype and kernel packed attention gets under mixed precision; what the fallback allocates


def record_kernel_dtypes(monkeypatch) -> list[torch.dtype]:
    from finetune.train import attention

    seen, decide = [], attention._can_use_flash
    monkeypatch.setattr(attention, "_can_use_flash",
                        lambda device, dtype, *a: seen.append(dtype) or decide(device, dtype, *a))
    return seen


def pretend_ampere(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=8, minor=0))


def test_fp32_master_weights_meet_the_kernel_in_autocast_dtype(monkeypatch):
    """Full fine-tuning keeps fp32 weights; under bf16 autocast the rotary multiply promotes q and
    k back to fp32. The kernel must still get bf16 (else, on a GPU, the dense-mask fallback)."""
    from finetune.train.attention import _can_use_flash, _varlen_kernel

    model, samples = tiny_model("qwen2"), make_samples()
    enable_packed_attention(model)
    assert next(model.parameters()).dtype == torch.float32
    seen = record_kernel_dtypes(monkeypatch)
    flat = collate_flat(samples)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(**flat.model_inputs()).logits
    assert seen == [torch.bfloat16] * model.config.num_hidden_layers
    # what that dtype decides on an Ampere GPU: the FlashAttention varlen kernel
    pretend_ampere(monkeypatch)
    if _varlen_kernel()[0] is not None:
        assert _can_use_flash(torch.device("cuda"), seen[0], 16, 0.0, None)
    assert not _can_use_flash(torch.device("cuda"), torch.float32, 16, 0.0, None)
    # and the packed result is still each sample alone (bf16 noise)
    assert max_diff(flat_slices(logits.float(), flat), alone_logits(model, samples)) < 0.1


def test_all_fp32_inputs_are_cast_under_autocast(monkeypatch):
    """After QLoRA's k-bit preparation q, k and v all arrive in fp32 (bitsandbytes layers return their
    input's dtype); autocast's dtype is what SDPA would have cast them to, so outputs are unchanged."""
    seen = record_kernel_dtypes(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 12, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16
    for a, b in ((0, 5), (5, 12)):
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t[:, :, a:b].bfloat16() for t in (q, k, v)), is_causal=True, enable_gqa=True)
        torch.testing.assert_close(out[0, a:b], ref[0].transpose(0, 1))


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest[0]:
                self.largest = (t.numel() * t.element_size(), f"{func}: {t.dtype} {tuple(t.shape)}")
        return out


@pytest.mark.parametrize("window", [None, 64])
def test_fallback_builds_nothing_of_tokens_squared(window):
    """At T tokens the old fallback built an int64 (T x T) distance matrix (0.5 GB at 8k) and SDPA a
    float (T x T) mask from the bool one. Per sample, no tensor reaches even T x T bytes."""
    T = 2048
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, T, 8, generator=gen, requires_grad=True) for h in (4, 2, 2))
    cu = torch.tensor([0, 700, 1300, 1301, T], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = True
    with LargestTensor() as spy:
        out, _ = packed_attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, sliding_window=window)
        out.sum().backward()
    assert spy.largest[0] < T * T, spy.largest
    a, b = 700, 1300  # still exact: one sample against SDPA on it alone
    mask = None
    if window is not None:
        i = torch.arange(b - a)
        mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    torch.testing.assert_close(out[0, a:b], ref[0].transpose(0, 1).detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("causal", "window"), [(True, None), (False, None), (True, 3), (False, 3)])
def test_compile_fallback_equals_per_sample_fallback(causal, window):
    """Inside torch.compile the fallback is one SDPA call with a bool block mask; same maths."""
    from finetune.train.attention import _block_mask_sdpa, _per_sample_sdpa

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 9, 8, generator=gen) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 9, 10, 18], dtype=torch.int32)  # two rows of 9 tokens, two samples each
    args = (q, k, v, cu, causal, window, 0.0, None)
    torch.testing.assert_close(_block_mask_sdpa(*args), _per_sample_sdpa(*args), atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (PyTorch FlashAttention varlen)")
def test_fp32_master_weights_take_the_flash_kernel_on_gpu(monkeypatch):
    """Full fine-tuning's fp32 weights under bf16 autocast: every layer's packed attention runs the
    varlen flash kernel (no per-sample or dense fallback) and the packed loss equals the padded one.
    Without autocast (precision fp32) the fallback runs on CUDA and still equals padded sdpa."""
    from finetune.train import attention

    calls = {"flash": 0, "fallback": 0}
    flash, fallback = attention._flash_varlen, attention._per_sample_sdpa
    monkeypatch.setattr(attention, "_flash_varlen", lambda *a: calls.__setitem__("flash", calls["flash"] + 1)
                        or flash(*a))
    monkeypatch.setattr(attention, "_per_sample_sdpa", lambda *a: calls.__setitem__(
        "fallback", calls["fallback"] + 1) or fallback(*a))
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=512, vocab_size=1000)
    model = enable_packed_attention(AutoModelForCausalLM.from_config(cfg).cuda())
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in (300, 17, 1, 211):
        ids = torch.randint(0, 1000, (n,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": ids})
    flat, padded = collate_flat(samples).to("cuda"), collate_padded(samples, pad_id=0).to("cuda")
    losses = {}
    for autocast in (True, False):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            losses[autocast] = [token_ce_sum(model(**b.model_inputs()).logits.float(), b.labels).item()
                                for b in (flat, padded)]
        if autocast:
            assert calls == {"flash": 2, "fallback": 0}
    assert calls == {"flash": 2, "fallback": 2}
    assert losses[True][0] == pytest.approx(losses[True][1], rel=2e-2)
    assert losses[False][0] == pytest.approx(losses[False][1], rel=1e-4)


@functools.cache
def tiny_special(kind: str):
    """Families whose attention varlen kernels cannot compute (softcapping, sinks) or that mix
    sliding-window and full layers; windows small enough that the samples below exceed them."""
    torch.manual_seed(0)
    extra = {
        "gemma2": {"attn_logit_softcapping": 5.0, "sliding_window": 3, "head_dim": 16},
        "gemma3_text": {"sliding_window": 3, "head_dim": 16},
        "gpt_oss": {"sliding_window": 3, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
        "mistral": {"sliding_window": 3},
    }[kind]
    cfg = AutoConfig.for_model(kind, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, vocab_size=100, **extra)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss", "gemma3_text", "mistral"])
def test_softcap_sinks_and_windows_packed_and_padded_equal_alone(kind):
    """Reference: each sample alone through the model's eager attention (the one that applies
    softcapping and sinks). Before, gemma2 / gpt_oss raised at the first packed forward."""
    from finetune.train.attention import special_attention

    model, samples = tiny_special(kind), make_samples(lengths=(5, 9, 3, 7))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = [model(torch.tensor([s["input_ids"]]), use_cache=False).logits[0] for s in samples]
    enable_packed_attention(model)
    flat, padded = collate_flat(samples), collate_padded(samples, pad_id=0, pad_to_multiple_of=8)
    with torch.no_grad():
        flat_logits = model(**flat.model_inputs()).logits
        padded_logits = model(**padded.model_inputs()).logits
    assert max_diff(flat_slices(flat_logits, flat), reference) < ATOL
    assert max_diff([padded_logits[i, :n] for i, n in enumerate(padded.seq_lens)], reference) < ATOL
    assert (special_attention(model) is not None) == (kind in ("gemma2", "gpt_oss"))
