"""The dpo trainer: parity with TRL's DPOTrainer, the two references (precomputed, adapter disabled),
resume, masks, errors, and learning on the quickstart preference pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.errors import DataError, RecipeError
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import ROOT, write
from tests.tiny_cache import shared_tiny_model

PAIRS = ROOT / "data/quickstart_rs/preference_train.jsonl"
PAIRS_EVAL = ROOT / "data/quickstart_rs/preference_eval.jsonl"


# A ChatML without the newline after <|im_end|>: TRL trains every token after the prompt, which would
# include that newline; we train the reply and its end-of-turn token. Without it the two agree.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def dpo_recipe(tmp, model_dir, n: int = 32, **dpo) -> dict:
    return {
        "model": {"name": str(model_dir)},
        "tokenizer": {"chat_template": "chatml", "max_length": 64},
        "data": {"train": [{"path": str(PAIRS), "max_samples": n}],
                 "eval": [{"path": str(PAIRS_EVAL), "max_samples": 16}]},
        "trainer": {"type": "dpo", "dpo": dpo},
        "optim": {"lr": 1e-3, "scheduler": "constant"},
        "run": {"output_dir": str(tmp / "dpo"), "max_steps": 3, "micro_batch_size": 8, "log_every": 1},
    }


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("ipo", {}), ("robust", {"label_smoothing": 0.1})])
def test_loss_equals_trl_dpo_trainer_on_the_same_model_data_and_batch(tmp_path, tiny_model_dir, loss, extra):
    """TRL tokenizes, masks, collates and computes its loss on its own; the policy differs from the
    reference (perturbed weights), so the loss is far from log 2 and every part matters."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from finetune.trainers import dpo

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    beta, n = 0.5, 8
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines()[:n]]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = TEMPLATE
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=n, report_to=[], use_cpu=True,
                     bf16=False, beta=beta, loss_type=[loss], label_smoothing=extra.get("label_smoothing", 0.0),
                     save_strategy="no")
    trl = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(conv),
                     processing_class=tok)
    trl.model.train()  # its metrics go to "train" (the tiny model has no dropout)
    theirs = trl.compute_loss(trl.model, next(iter(trl.get_train_dataloader()))).item()

    data = dpo_recipe(tmp_path, tiny_model_dir, loss=loss, beta=beta, **extra)
    pairs = write(tmp_path / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    data["data"] = {"train": [{"path": str(pairs)}]}  # the same rows in the same order as TRL's
    data["tokenizer"]["chat_template"] = TEMPLATE
    recipe = recipe_from_dict(data)
    prepared = dpo.prepare(recipe)
    collate = lambda units: dpo.collate_pairs(units, True, prepared.tokenizer.pad_token_id)  # noqa: E731
    from finetune.train.attention import enable_packed_attention

    for model in (reference, policy):
        enable_packed_attention(model.eval())
    ref = dpo.DPOLoss.logps(reference, collate(prepared.train_units))[0].tolist()
    for k, unit in enumerate(prepared.train_units):
        unit["ref"] = [ref[k], ref[n + k]]
    loss_sum, stats = dpo.DPOLoss(recipe.trainer.dpo)(policy, collate(prepared.train_units))
    ours = loss_sum.item() / n
    assert abs(ours - math.log(2)) > 0.01  # a real test, not log 2 on both sides
    assert ours == pytest.approx(theirs, abs=1e-4)
    margin = trl._metrics["train"]["rewards/margins"][-1]
    assert stats["rewards/margin"].item() / n == pytest.approx(margin, abs=1e-4)


@pytest.mark.parametrize("adapter", [None, {"r": 4, "alpha": 8}])
def test_first_step_is_log2_with_zero_rewards_and_training_moves_them(in_tmp, tiny_model_dir, adapter):
    recipe = dpo_recipe(in_tmp, tiny_model_dir)
    recipe["adapter"] = adapter
    recipe["run"]["eval_at_start"] = True
    run_recipe(recipe_from_dict(recipe))
    recs = records(in_tmp / "dpo")
    first_eval, first = recs[0], recs[1]
    assert first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and first_eval["eval_rewards/margin"] == 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the reference is the starting policy
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0
    assert set(first) >= {"rewards/margin", "rewards/accuracy", "logps/chosen", "logps/rejected"}
    last_eval = recs[-1]
    assert last_eval["eval_rewards/chosen"] != 0 and "eval_rewards/accuracy" in last_eval
    if adapter is None:  # the held-out means the engine logged == the same pairs scored here at once
        from transformers import AutoModelForCausalLM

        from finetune.trainers import dpo

        prepared = dpo.prepare(recipe_from_dict(recipe))
        units = prepared.eval_units
        batch = dpo.collate_pairs(units, False, prepared.tokenizer.pad_token_id)
        with torch.no_grad():
            ref = dpo.DPOLoss.logps(AutoModelForCausalLM.from_pretrained(tiny_model_dir), batch)[0]
            batch.ref_logps = ref
            loss_sum, stats = dpo.DPOLoss(recipe_from_dict(recipe).trainer.dpo)(
                AutoModelForCausalLM.from_pretrained(in_tmp / "dpo" / "final"), batch)
        assert last_eval["eval_loss"] == pytest.approx(loss_sum.item() / len(units), abs=1e-5)
        for name in ("rewards/chosen", "rewards/margin", "rewards/accuracy", "logps/rejected"):
            # metrics.jsonl keeps 6 significant digits
            assert last_eval[f"eval_{name}"] == pytest.approx(stats[name].item() / len(units), rel=1e-5, abs=1e-5)


def test_lora_reference_by_disabled_adapter_equals_the_precomputed_one(in_tmp, tiny_model_dir):
    """Under LoRA the base is frozen, so the adapter-disabled forward and the precomputed pass are the
    same reference: the runs agree step by step (a wrong reference on either side would not)."""
    losses = {}
    for precompute in (False, True):
        recipe = dpo_recipe(in_tmp, tiny_model_dir, precompute_ref=precompute)
        recipe["adapter"] = {"r": 4, "alpha": 8}
        recipe["optim"]["lr"] = 2e-2
        recipe["run"]["output_dir"] = str(in_tmp / f"pre{precompute}")
        run_recipe(recipe_from_dict(recipe))
        losses[precompute] = [(r["loss"], r["rewards/margin"]) for r in records(in_tmp / f"pre{precompute}")
                              if "loss" in r]
    assert losses[True][-1][1] != 0
    for a, b in zip(losses[False], losses[True], strict=True):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_resumed_run_keeps_the_starting_model_as_reference(in_tmp, tiny_model_dir):
    """The reference pass runs before the checkpoint is restored: 2 steps + 2 more == 4 steps."""
    def recipe(out: str, steps: int) -> dict:
        r = dpo_recipe(in_tmp, tiny_model_dir)
        r["run"].update(output_dir=str(in_tmp / out), max_steps=steps, save_every=2)
        return r

    run_recipe(recipe_from_dict(recipe("long", 4)))
    run_recipe(recipe_from_dict(recipe("grown", 2)))
    run_recipe(recipe_from_dict(recipe("grown", 4)))
    a = [r for r in records(in_tmp / "long") if "loss" in r]
    b = [r for r in records(in_tmp / "grown") if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["rewards/margin"] == pytest.approx(y["rewards/margin"], abs=1e-6)


def test_bad_input_is_one_clear_error(in_tmp, tiny_model_dir):
    with pytest.raises(RecipeError, match="label_smoothing applies to the sigmoid, robust and simpo"):
        recipe_from_dict(dpo_recipe(in_tmp, tiny_model_dir, loss="ipo", label_smoothing=0.1))
    with pytest.raises(RecipeError, match="trainer.dpo.loss"):
        recipe_from_dict(dpo_recipe(in_tmp, tiny_model_dir, loss="kto"))
    recipe = dpo_recipe(in_tmp, tiny_model_dir)
    recipe["data"]["train"][0]["format"] = "prompts"
    with pytest.raises(DataError, match="data.train.0.format: trainer dpo reads format 'preference'"):
        run_recipe(recipe_from_dict(recipe))
    assert not (in_tmp / "dpo").exists()


def test_preference_masks_train_the_reply_and_its_end_of_turn_only(in_tmp, tiny_model_dir, capsys):
    from finetune.trainers import dpo

    rows = [{"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "What is 2 + 2?"}],
             "chosen": "2 + 2 = 4", "rejected": [{"role": "assistant", "content": "2 + 2 = 5"}]},
            {"chosen": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "1 + 1 = 2"}],
             "rejected": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "11"}]}]
    write(in_tmp / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    recipe = dpo_recipe(in_tmp, tiny_model_dir)
    recipe["data"] = {"train": [{"path": str(in_tmp / "pairs.jsonl")}]}  # format auto
    prepared = dpo.prepare(recipe_from_dict(recipe))
    tok = prepared.tokenizer
    trained = [[tok.decode([i for i, label in zip(u[side]["input_ids"], u[side]["labels"], strict=True)
                            if label != -100]) for side in ("chosen", "rejected")] for u in prepared.train_units]
    assert trained == [["2 + 2 = 4<|im_end|>", "2 + 2 = 5<|im_end|>"], ["1 + 1 = 2<|im_end|>", "11<|im_end|>"]]
    # `finetune data` shows the same masks, chosen then rejected
    import yaml

    from finetune.cli.main import main

    path = write(in_tmp / "dpo.yaml", yaml.safe_dump(recipe))
    capsys.readouterr()
    assert main(["data", str(path), "--json", "--samples", "4"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ["".join(t for t, m in zip(s["tokens"], s["labels_mask"], strict=True) if m) for s in shown] == \
        [text for pair in trained for text in pair]


@pytest.mark.parametrize("loss,extra", [("sigmoid", {}), ("ipo", {}), ("simpo", {"beta": 2.0})])
def test_each_loss_learns_the_quickstart_preferences(in_tmp, tiny_model_dir, loss, extra):
    """16 quickstart pairs (the fact restated vs. a misstated problem), 8 epochs from the tiny random
    model: the pairs' reward margin and accuracy rise (held-out pairs need a model that can copy
    the question's numbers, which this one cannot yet; recipes/dpo.yaml measures those)."""
    recipe = dpo_recipe(in_tmp, tiny_model_dir, n=16, loss=loss, **extra)
    recipe["data"].pop("eval")
    recipe["optim"]["lr"] = 3e-3
    recipe["run"].update(max_steps=16, log_every=4)
    run_recipe(recipe_from_dict(recipe))
    train = [r for r in records(in_tmp / "dpo") if "loss" in r]
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"] + 0.3
    assert train[-1]["rewards/accuracy"] >= 0.9 > train[0]["rewards/accuracy"]
    assert train[-1]["loss"] < train[0]["loss"]


def test_padding_free_and_padded_batches_give_the_same_loss_and_gradients(in_tmp, tiny_model_dir):
    """Chosen and rejected concatenated in one row (attention kept per sample) == padded rows."""
    from transformers import AutoModelForCausalLM

    from finetune.train.attention import enable_packed_attention
    from finetune.trainers import dpo

    recipe = recipe_from_dict(dpo_recipe(in_tmp, tiny_model_dir, n=6, loss="simpo", beta=2.0))
    prepared = dpo.prepare(recipe)
    model = enable_packed_attention(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    results = []
    for flat in (True, False):
        model.zero_grad()
        batch = dpo.collate_pairs(prepared.train_units, flat, prepared.tokenizer.pad_token_id)
        assert batch.input_ids.shape[0] == (1 if flat else 12)
        loss, stats = dpo.DPOLoss(recipe.trainer.dpo)(model, batch)
        loss.backward()
        results.append((loss.item(), stats["rewards/margin"].item(), [p.grad.clone() for p in model.parameters()]))
    (a, ma, ga), (b, mb, gb) = results
    assert a == pytest.approx(b, rel=1e-5) and ma == pytest.approx(mb, abs=1e-5)  # a difference of ~11s
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_dpo_is_a_pipeline_stage_after_sft(in_tmp, tiny_model_dir):
    import yaml

    from finetune.run.pipeline import run_pipeline
    from tests.conftest import tiny_sft_recipe

    sft = tiny_sft_recipe(in_tmp, tiny_model_dir, max_steps=2)
    sft["trainer"]["exact_match_samples"] = 0
    sft["data"].pop("eval")
    write(in_tmp / "sft.yaml", yaml.safe_dump(sft))
    write(in_tmp / "dpo.yaml", yaml.safe_dump(dpo_recipe(in_tmp, "placeholder", n=8) | {"adapter": {"r": 4}}))
    stages = [{"name": "sft", "recipe": "sft.yaml"},
              {"name": "dpo", "recipe": "dpo.yaml", "overrides": {"model.name": "stage:sft", "run.max_steps": 2}}]
    pipe = {"pipeline": {"output_dir": str(in_tmp / "story")}, "stages": stages}
    root = run_pipeline(write(in_tmp / "pipe.yaml", yaml.safe_dump(pipe)))
    assert (root / "dpo" / "final" / "adapter_config.json").is_file()
    assert yaml.safe_load((root / "dpo" / "recipe.yaml").read_text())["model"]["name"] == str(root / "sft" / "final")
    assert any("rewards/margin" in r for r in records(root / "dpo"))


def test_sft_weight_adds_the_chosen_replies_nll_per_token(in_tmp, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.trainers import dpo

    recipe = recipe_from_dict(dpo_recipe(in_tmp, tiny_model_dir, n=4, loss="simpo", beta=2.0))
    prepared = dpo.prepare(recipe)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = dpo.collate_pairs(prepared.train_units, False, prepared.tokenizer.pad_token_id)
    plain, _ = dpo.DPOLoss(recipe.trainer.dpo)(model, batch)
    recipe.trainer.dpo.sft_weight = 0.5
    with_nll, stats = dpo.DPOLoss(recipe.trainer.dpo)(model, batch)
    logps, counts = dpo.DPOLoss.logps(model, batch)
    nll = sum(-logps[k].item() / counts[k].item() for k in range(4))  # the chosen replies are samples 0..3
    assert with_nll.item() == pytest.approx(plain.item() + 0.5 * nll, rel=1e-5)
    assert stats["nll/chosen"].item() == pytest.approx(nll, rel=1e-5)


def test_engine_statistics_in_eval_are_global_means_with_the_same_reductions_on_every_rank(in_tmp):
    """A rank whose share of the last eval batch is empty still reduces every statistic (so no rank
    waits on another), and the ranks' sums give the one-process means."""
    from finetune.train import engine
    from finetune.train.collate import collate_padded
    from tests.conftest import tiny_pretrain_recipe
    from tests.test_engine import samples_of_different_lengths, tiny_model
    from tests.test_scaleout import RankOf

    model = tiny_model()

    def loss_sum(m, batch):
        return engine.causal_lm_loss_sum(m, batch), {"rows": torch.tensor(float(batch.input_ids.shape[0]))}

    units = samples_of_different_lengths()[:1]  # 1 unit, 2 ranks: rank 1 only runs a stand-in forward
    task = engine.SupervisedTask(model=model, tokenizer=None, train_units=[], eval_units=units,
                                 collate=lambda s: collate_padded(s, pad_id=0), loss_sum=loss_sum)
    r = recipe_from_dict(tiny_pretrain_recipe(in_tmp, micro_batch_size=1))
    one = engine.evaluate(r, task, model, RankOf(0, 1))
    sums = []
    for rank in range(2):
        acc = RankOf(rank, 2)
        engine.evaluate(r, task, model, acc)
        sums.append(acc.sums)
    assert len(sums[0]) == len(sums[1]) == 3  # loss, trained tokens, rows
    loss, trained, rows = (a + b for a, b in zip(*sums, strict=True))
    assert loss / trained == pytest.approx(one["eval_loss"], rel=1e-9)
    assert rows / trained == pytest.approx(one["eval_rows"], rel=1e-9) and one["eval_rows"] > 0
