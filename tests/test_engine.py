"""The supervised engine: loss normalisation invariants, data order, a real pretrain run, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from finetune.errors import RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from finetune.train import checkpoint, engine
from finetune.train.collate import collate_padded
from tests.conftest import crash_after_checkpoint, read_metrics, tiny_llama, tiny_pretrain_recipe
from tests.conftest import read_losses as losses_of


def tiny_model(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(seed, vocab_size=50)


def samples_of_different_lengths() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (3, 9, 5, 14):
        ids = torch.randint(1, 50, (n,), generator=g).tolist()
        labels = list(ids)
        labels[: n // 2] = [-100] * (n // 2)  # prompt-like untrained prefix: unequal trained counts
        out.append({"input_ids": ids, "labels": labels})
    return out


def grads_after(micro_sizes: list[int]) -> dict[str, torch.Tensor]:
    model = tiny_model()
    acc = Accelerator(cpu=True)
    task = engine.SupervisedTask(model=model, tokenizer=None, train_units=[],
                                 collate=lambda s: collate_padded(s, pad_id=0))
    samples, micro, i = samples_of_different_lengths(), [], 0
    for n in micro_sizes:
        micro.append(task.collate(samples[i:i + n]))
        i += n
    engine.accumulate_gradients(acc, model, task, micro)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulation_1x4_equals_4x1():
    one_by_four = grads_after([1, 1, 1, 1])
    four_by_one = grads_after([4])
    two_by_two = grads_after([2, 2])
    for name in one_by_four:
        torch.testing.assert_close(one_by_four[name], four_by_one[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(two_by_two[name], four_by_one[name], atol=1e-5, rtol=1e-5)


def test_mean_of_micro_means_would_differ():
    """Negative control: the naive normalisation gives different gradients on these samples."""
    model = tiny_model()
    samples = samples_of_different_lengths()
    from finetune.train.losses import count_trained_tokens, token_ce_sum

    for s in samples:
        b = collate_padded([s], pad_id=0)
        (token_ce_sum(model(**b.model_inputs()).logits, b.labels) / count_trained_tokens(b.labels) / 4).backward()
    naive = {n: p.grad.clone() for n, p in model.named_parameters()}
    exact = grads_after([4])
    assert any(not torch.allclose(naive[n], exact[n], atol=1e-5) for n in naive)


def test_stream_is_a_permutation_per_epoch_and_ranks_are_disjoint():
    streams = [engine.MicroBatchStream(22, 3, world=2, rank=r, seed=7, shuffle=True) for r in range(2)]
    assert streams[0].per_epoch == 3  # 22 // 6; the 4-unit tail is dropped
    for epoch in range(2):
        seen = [i for s in streams for k in range(3) for i in s.indices(epoch * 3 + k)]
        assert len(seen) == len(set(seen)) == 18
    assert streams[0].indices(0) != streams[0].indices(3)  # a new order each epoch
    again = engine.MicroBatchStream(22, 3, world=2, rank=0, seed=7, shuffle=True)
    assert [again.indices(k) for k in range(6)] == [streams[0].indices(k) for k in range(6)]


def trainable_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_pretrain_run_learns_and_writes_the_layout(in_tmp, monkeypatch):
    from finetune.models import loading

    real_load, initial = loading.load_model, {}

    def load_and_remember(*args, **kwargs):  # the weights as built, before the first step
        model, info = real_load(*args, **kwargs)
        initial.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model, info

    monkeypatch.setattr(loading, "load_model", load_and_remember)
    recipe = recipe_from_dict(tiny_pretrain_recipe(in_tmp, max_steps=30, save_every=10, keep_last=2,
                                                   eval_every=15), "tiny.yaml")
    recipe.data.eval_fraction = 0.2
    final = run_recipe(recipe)
    out = in_tmp / "out"
    assert final == out / "final"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final", "metrics.jsonl", "recipe.yaml"]
    # keep_last=2; the last step is saved too, so a finished run can be continued
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-20", "step-30"]
    ckpt = out / "checkpoints" / "step-20"
    for name in ("model", "tokenizer", "optimizer.pt", "scheduler.pt", "rng-0.pt", "trainer_state.json",
                 "manifest.json"):
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 20
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file() and (final / "chat_template.jinja").is_file()
    records = read_metrics(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(map(lambda x: x == x and x < 100, losses))  # finite
    assert losses[-1] < losses[0] * 0.7
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
        assert key in records[0]
    # every parameter moved from its initialisation and was saved under its own name
    saved = load_file(final / "model.safetensors")
    assert initial and set(initial) <= set(saved)
    assert [n for n in initial if torch.equal(initial[n], saved[n])] == []
    loaded = AutoModelForCausalLM.from_pretrained(final)  # and the saved config fits its tokenizer
    assert loaded.config.vocab_size == len(__import__("transformers").AutoTokenizer.from_pretrained(final))


def test_resumed_run_equals_uninterrupted(in_tmp, monkeypatch):
    base = tiny_pretrain_recipe(in_tmp, max_steps=8, save_every=3)
    base["model"]["init_config"]["attention_dropout"] = 0.1  # RNG must be restored, too
    full = recipe_from_dict(base)
    full.run.output_dir = str(in_tmp / "full")
    run_recipe(full)

    crashed = recipe_from_dict(base)
    crashed.run.output_dir = str(in_tmp / "crash")
    crash_after_checkpoint(monkeypatch, 6)  # killed right after the second checkpoint
    with pytest.raises(KeyboardInterrupt):
        run_recipe(crashed)
    assert not (in_tmp / "crash" / "final").exists()
    run_recipe(recipe_from_dict(base | {"run": base["run"] | {"output_dir": str(in_tmp / "crash")}}))
    a = trainable_weights(in_tmp / "full" / "final")
    b = trainable_weights(in_tmp / "crash" / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    resumed = read_metrics(in_tmp / "crash")
    assert [r["step"] for r in resumed if "loss" in r][-2:] == [7, 8]


def test_refuses_checkpoints_of_a_different_run(in_tmp):
    data = tiny_pretrain_recipe(in_tmp, max_steps=4, save_every=2)
    out = in_tmp / "out"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "trainer_state.json").write_text("{}")
    (out / "checkpoints" / "step-2" / "manifest.json").write_text('{"step": 2, "files": {}}')
    other = recipe_from_dict(data)
    other.optim.lr = 0.5
    from finetune.recipe.schema import write_recipe

    write_recipe(other, out / "recipe.yaml")
    with pytest.raises(RecipeError, match=r"different run \(differs in optim.lr\)"):
        run_recipe(recipe_from_dict(data))


def test_refuses_to_overwrite_a_finished_run(in_tmp):
    data = tiny_pretrain_recipe(in_tmp, max_steps=2)
    (in_tmp / "out" / "final").mkdir(parents=True)
    with pytest.raises(RecipeError, match="already holds a finished run"):
        run_recipe(recipe_from_dict(data))


def test_gradient_checkpointing_changes_nothing_numerically(in_tmp):
    plain = tiny_pretrain_recipe(in_tmp, max_steps=3, output_dir=str(in_tmp / "plain"))
    ckpt = tiny_pretrain_recipe(in_tmp, max_steps=3, output_dir=str(in_tmp / "gc"))
    ckpt["model"]["gradient_checkpointing"] = True
    run_recipe(recipe_from_dict(plain))
    run_recipe(recipe_from_dict(ckpt))
    assert losses_of(in_tmp / "gc") == pytest.approx(losses_of(in_tmp / "plain"), rel=1e-5)


@pytest.mark.parametrize(("section", "key", "value"), [
    ("run", "precision", "bf16"), ("optim", "name", "adamw_8bit"), ("run", "report_to", ["tensorboard"]),
    ("run", "grad_accum", 3),
])
def test_engine_options_run_and_learn(in_tmp, monkeypatch, section, key, value):
    data = tiny_pretrain_recipe(in_tmp, max_steps=5)
    data[section][key] = value
    seen = spy_on_the_engine(monkeypatch)
    run_recipe(recipe_from_dict(data))  # several in one process: accelerate state is released
    losses = losses_of(in_tmp / "out")
    assert len(losses) == 5 and losses[-1] < losses[0]
    if value == ["tensorboard"]:
        assert list((in_tmp / "out" / "logs").rglob("events.out.tfevents.*"))
    # The option's mechanism, not only a falling loss: autocast in the forward ...
    bf16 = value == "bf16"
    assert seen["autocast"] and set(seen["autocast"]) == {(True, torch.bfloat16) if bf16 else (False, None)}
    # ... the optimizer's class (8-bit: its Adam moments are stored as uint8) ...
    opt = seen["optimizer"]
    if value == "adamw_8bit":
        import bitsandbytes as bnb

        assert isinstance(opt, bnb.optim.AdamW8bit)
        assert any(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    else:
        assert type(opt) is torch.optim.AdamW
    # ... and per optimizer step grad_accum micro-batches of micro_batch_size rows, whose tokens
    # are what metrics.jsonl counts for that step.
    accum = value if key == "grad_accum" else 1
    assert [[rows for rows, _ in step] for step in seen["steps"]] == [[4] * accum] * 5
    tokens = [r["tokens"] for r in read_metrics(in_tmp / "out") if "loss" in r]
    per_step = [b - a for a, b in zip([0, *tokens], tokens, strict=False)]
    assert per_step == [sum(n for _, n in step) for step in seen["steps"]]


def spy_on_the_engine(monkeypatch) -> dict:
    """Records the optimizer engine.train builds, autocast as the model's layers run, and the
    (rows, tokens) of each micro-batch of each optimizer step."""
    seen = {"autocast": [], "steps": []}
    real_optimizer, real_accumulate = engine.build_optimizer, engine.accumulate_gradients

    def build_optimizer(recipe, model):
        seen["optimizer"] = real_optimizer(recipe, model)
        model.model.layers[0].register_forward_hook(lambda *_: seen["autocast"].append(
            (True, torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else (False, None)))
        return seen["optimizer"]

    def accumulate_gradients(accelerator, model, task, micro, *args, **kwargs):
        seen["steps"].append([(int(b.input_ids.shape[0]), b.num_tokens) for b in micro])
        return real_accumulate(accelerator, model, task, micro, *args, **kwargs)

    monkeypatch.setattr(engine, "build_optimizer", build_optimizer)
    monkeypatch.setattr(engine, "accumulate_gradients", accumulate_gradients)
    return seen


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
def test_warmup_applies_to_every_scheduler(scheduler):
    # transformers' "constant" ignores num_warmup_steps; a recipe asking for warmup gets one.
    from finetune.train.engine import build_scheduler

    recipe = recipe_from_dict({"model": {"name": "m"}, "data": {"train": [{"path": "x.jsonl"}]},
                               "trainer": {"type": "sft"},
                               "optim": {"lr": 1.0, "warmup_steps": 4, "scheduler": scheduler},
                               "run": {"output_dir": "out", "max_steps": 20}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(recipe, opt, 20)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=0.02), lrs


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "steps"), [(0, 1), (0, 17), (4, 20), (7, 7), (3, 1000)])
def test_schedules_equal_transformers_step_by_step(name, warmup, steps):
    # finetune/train/schedules.py rebuilds transformers' formulas without importing them (start-up
    # time); the learning rates must be the same floats, past the end of the schedule too.
    from transformers import get_scheduler

    from finetune.train.schedules import lr_schedule

    def lrs(make) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = make(opt)
        out = []
        for _ in range(min(steps + 5, 60)):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out + [sched.lr_lambdas[0](s) for s in (0, warmup, steps // 2, steps, steps + 3)]

    ours = lrs(lambda opt: lr_schedule(name, opt, warmup, steps))
    theirs = lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps))
    assert ours == theirs  # exact: the same formulas in the same order
