"""finetune.train.fastpath on the CPU: the fused loss through the model's forward equals the plain path
(values and gradients, masks respected, LoRA, padded and flat batches), the head tap is invisible
outside the loss, compiled layers change nothing, and sync-free batches count what the engine counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from finetune.errors import RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.train import engine, fastpath
from finetune.train.attention import enable_packed_attention
from finetune.train.collate import collate_flat, collate_padded
from finetune.train.losses import count_trained_tokens
from tests.conftest import TINY_LLAMA, read_losses, tiny_llama


def tiny_model(seed: int = 0, **extra) -> torch.nn.Module:
    return tiny_llama(seed, **{"vocab_size": 97, **extra})


def masked_samples(seed: int = 0) -> list[dict]:
    """Three samples of different lengths; a 'prompt' of each is masked (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length, prompt in ((9, 3), (5, 0), (12, 7)):
        ids = torch.randint(3, 97, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert torch.allclose(la, lb, rtol=tol, atol=tol), (la, lb)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6), name


def test_loss_positions_by_hand():
    labels = torch.tensor([[-100, 5, 6, -100], [7, -100, 8, 9]])
    index, targets = fastpath.loss_positions(labels)
    # position t predicts label t + 1 of the same row; flat over (rows, time)
    assert index.tolist() == [0, 1, 5, 6]
    assert targets.tolist() == [5, 6, 8, 9]
    assert len(index) == count_trained_tokens(labels)


def test_fast_batch_counts_on_the_cpu_and_moves_everything():
    batch = fastpath.wrap_collate(collate_flat, pin=False)(masked_samples())
    assert isinstance(batch, fastpath.FastBatch)
    assert batch.trained_tokens == count_trained_tokens(batch.labels) == fastpath.count_tokens(batch)
    moved = batch.to("cpu")
    assert isinstance(moved, fastpath.FastBatch) and moved.trained_tokens == batch.trained_tokens
    assert torch.equal(moved.loss_index, batch.loss_index) and moved.cu_seq_lens is not None
    plain = collate_flat(masked_samples())
    assert fastpath.count_tokens(plain) == batch.trained_tokens


@pytest.mark.parametrize("layout", ["padded", "flat"])
def test_fused_loss_equals_plain_loss_and_gradients(layout):
    model = tiny_model()
    if layout == "flat":
        enable_packed_attention(model)
        collate = collate_flat
    else:
        collate = lambda s: collate_padded(s, pad_id=0)  # noqa: E731
    plain = loss_and_grads(model, engine.causal_lm_loss_sum, collate(masked_samples()))
    loss = fastpath.ChunkedCausalLMLoss(model, chunk_size=4)  # several chunks
    fast = loss_and_grads(model, loss, fastpath.wrap_collate(collate, pin=False)(masked_samples()))
    assert_same(plain, fast)
    # A plain Batch (eval batches) takes the same path, positions found on the device.
    assert_same(plain, loss_and_grads(model, loss, collate(masked_samples())))


def test_fused_loss_with_lora_trains_only_the_adapter():
    recipe = recipe_from_dict({
        "model": {"init_config": dict(TINY_LLAMA)}, "data": {"train": [{"path": "x"}]},
        "adapter": {"type": "lora", "r": 4, "alpha": 8}, "trainer": {"type": "sft"}, "run": {"output_dir": "x"},
    })
    from finetune.models.loading import add_adapter

    model = add_adapter(tiny_model(), recipe)
    enable_packed_attention(model)
    plain = loss_and_grads(model, engine.causal_lm_loss_sum, collate_flat(masked_samples()))
    fast = loss_and_grads(model, fastpath.ChunkedCausalLMLoss(model, chunk_size=8),
                          fastpath.wrap_collate(collate_flat, pin=False)(masked_samples()))
    assert_same(plain, fast)
    assert fast[1] and all("lora_" in name for name in fast[1])


def test_fused_loss_applies_the_models_logit_softcap():
    cfg = {"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 97,
           "final_logit_softcapping": 5.0, "attn_logit_softcapping": None, "sliding_window": 16}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg),
                                             attn_implementation="eager")
    batch = collate_padded(masked_samples(), pad_id=0)
    plain = loss_and_grads(model, engine.causal_lm_loss_sum, batch)
    fast = loss_and_grads(model, fastpath.ChunkedCausalLMLoss(model, chunk_size=4), batch)
    assert_same(plain, fast)


def test_head_tap_is_invisible_outside_the_loss():
    model = tiny_model()
    batch = collate_padded(masked_samples(), pad_id=0)
    before = model(**batch.model_inputs()).logits
    loss = fastpath.ChunkedCausalLMLoss(model)
    loss(model, fastpath.wrap_collate(lambda s: collate_padded(s, pad_id=0), pin=False)(masked_samples()))
    after = model(**batch.model_inputs()).logits
    assert torch.equal(before, after)
    assert "lm_head.weight" in model.state_dict()
    ids = torch.tensor([[5, 6, 7]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)
    # A second loss object reuses the tap instead of stacking another.
    assert fastpath.ChunkedCausalLMLoss(model).tap is loss.tap


def test_all_masked_micro_batch_gives_zero_and_backward_works():
    model = tiny_model()
    samples = [{"input_ids": [4, 5, 6], "labels": [-100, -100, -100]}]
    batch = fastpath.wrap_collate(collate_flat, pin=False)(samples)
    enable_packed_attention(model)
    loss = fastpath.ChunkedCausalLMLoss(model)(model, batch)
    loss.backward()
    assert float(loss.detach()) == 0.0 and batch.trained_tokens == 0


def test_compiled_layers_change_nothing():
    model = tiny_model()
    enable_packed_attention(model)
    keys = list(model.state_dict())
    batch = fastpath.wrap_collate(collate_flat, pin=False)(masked_samples())
    loss = fastpath.ChunkedCausalLMLoss(model)
    eager = loss_and_grads(model, loss, batch)
    assert fastpath.compile_layers(model, backend="eager") == TINY_LLAMA["num_hidden_layers"]
    assert list(model.state_dict()) == keys
    assert_same(eager, loss_and_grads(model, loss, batch))


def test_packed_probe_is_skipped_for_flat_batches(monkeypatch):
    from transformers import masking_utils

    fastpath._install_packed_probe_skip()
    calls = []
    inner = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda *a, **k: calls.append(1) or inner(*a, **k))
    monkeypatch.setattr(fastpath, "_PROBE_PATCHED", False)  # wrap the spy: the skip sits in front of it
    fastpath._install_packed_probe_skip()
    model = tiny_model()
    enable_packed_attention(model)
    batch = collate_flat(masked_samples())
    plain = engine.causal_lm_loss_sum(model, batch)
    assert calls, "transformers no longer probes position_ids: the skip is obsolete"
    calls.clear()
    assert torch.equal(fastpath.plain_loss_sum(model, batch), plain)
    assert not calls


def test_use_chunked_ce_settings(monkeypatch):
    model = tiny_model()
    recipe = recipe_from_dict({"model": {"init_config": dict(TINY_LLAMA)}, "data": {"train": [{"path": "x"}]},
                               "trainer": {"type": "sft"}, "run": {"output_dir": "x", "chunked_ce": "auto"}})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fastpath.use_chunked_ce(recipe, model) is False  # auto: CUDA only
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert fastpath.use_chunked_ce(recipe, model) is True
    monkeypatch.setattr(recipe.launch, "strategy", "fsdp")
    assert fastpath.use_chunked_ce(recipe, model) is False
    assert "FSDP" in fastpath.chunked_ce_problem(model, recipe)
    model.lm_head = torch.nn.Sequential(model.lm_head)
    with pytest.raises(RecipeError, match="plain torch.nn.Linear"):
        fastpath.ChunkedCausalLMLoss(model)


def test_engine_steps_with_the_fast_path_equal_the_plain_path(in_tmp):
    """Three optimizer steps through engine.train: same weights either way (fp32, CPU)."""
    samples = [s for seed in range(4) for s in masked_samples(seed)]

    def train(fast: bool, out: str) -> dict:
        model = tiny_model()
        enable_packed_attention(model)
        recipe = recipe_from_dict({
            "model": {"init_config": dict(TINY_LLAMA)}, "data": {"train": [{"path": "x"}], "shuffle": False},
            "trainer": {"type": "sft"}, "optim": {"lr": 1e-2},
            "run": {"output_dir": out, "max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "log_every": 1,
                    "precision": "fp32"}})
        pieces = fastpath.setup(recipe, model, chunked_ce=True) if fast else None
        task = engine.SupervisedTask(
            model=model, tokenizer=None, train_units=samples,
            collate=pieces.wrap_collate(collate_flat) if fast else collate_flat,
            **({"loss_sum": pieces.loss_sum, "count_tokens": pieces.count_tokens} if fast else {}))
        engine.train(recipe, task)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    start = {n: p.detach().clone() for n, p in tiny_model().named_parameters()}
    plain, fast = train(False, "plain"), train(True, "fast")
    for name in plain:
        # Adam normalises each update, so fp32 rounding in a near-zero gradient shows up in its
        # weight at ~1e-5 of lr; the updates themselves agree to 1e-3.
        moved = (plain[name] - start[name]).norm()
        assert (plain[name] - fast[name]).norm() <= 1e-3 * moved + 1e-7, name
    # Two summation orders, logged to 6 significant digits: equal to rounding, not bit for bit.
    plain_losses, fast_losses = read_losses(in_tmp / "plain"), read_losses(in_tmp / "fast")
    assert len(plain_losses) == 3 and fast_losses == pytest.approx(plain_losses, rel=2e-5)


def packed_batches(lengths_per_batch, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in lengths_per_batch:
        samples = []
        for n in lengths:
            ids = torch.randint(3, 97, (n,), generator=g).tolist()
            samples.append({"input_ids": ids, "labels": ids})
        out.append(fastpath.wrap_collate(collate_flat, pin=False)(samples))
    return out


def test_compiled_checkpointed_layers_trace_whole_across_packed_lengths():
    """With activation checkpointing, one graph break inside a layer (the old offsets check on the
    CPU) made dynamo give up on the whole checkpointed layer: nothing compiled, silently. Now: no
    graph break, one recompile when the length first changes (then dynamic), eager's numbers."""
    from torch._dynamo.utils import counters

    def run(compiled: bool):
        model = tiny_model(num_hidden_layers=1)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        enable_packed_attention(model)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            fastpath.compile_layers(model, backend="eager")
        return [loss_and_grads(model, fastpath.plain_loss_sum, b) for b in
                packed_batches([(9, 5, 12), (7, 20), (3, 4, 6, 11, 2)])]

    eager = run(False)
    compiled = run(True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # the layer was compiled at all
    assert counters["frames"]["total"] <= 2  # three lengths: static, then one dynamic recompile
    torch._dynamo.reset()
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled, strict=True):
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (inductor's GPU kernels)")
def test_inductor_compiles_checkpointed_packed_layers_on_gpu():
    """run.compile as a GPU run has it: inductor, bf16 autocast over fp32 weights, activation
    checkpointing, the flash varlen kernel, three packed lengths. No graph break, at most two
    recompiles (length, then the sample count, become dynamic), eager's loss within bf16 noise."""
    from torch._dynamo.utils import counters

    def run(compiled: bool):
        model = tiny_model(num_hidden_layers=1, hidden_size=128, intermediate_size=256).cuda()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        enable_packed_attention(model)
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            fastpath.compile_layers(model)
        out = []
        for b in packed_batches([(90, 50, 120), (70, 200), (30, 40, 60, 110, 20)]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out.append(loss_and_grads(model, fastpath.plain_loss_sum, b.to("cuda")))
        return out

    eager = run(False)
    compiled = run(True)
    print("dynamo counters:", {k: dict(v) for k, v in counters.items() if k in ("frames", "stats", "graph_break")})
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert counters["frames"]["total"] <= 3
    torch._dynamo.reset()
    for (loss_e, _), (loss_c, _) in zip(eager, compiled, strict=True):
        assert float(loss_c) == pytest.approx(float(loss_e), rel=2e-2)
