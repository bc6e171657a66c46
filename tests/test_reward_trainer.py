"""Reward models: the Bradley-Terry loss by hand, the last-token read-out under any padding, the
trainer (full and LoRA) learning a preference, and the checks a reward-model directory must pass."""

from __future__ import annotations

import json
import math

import pytest
import torch

from finetune.errors import DataError, RecipeError
from finetune.models.reward_model import (
    RewardModelScorer,
    bradley_terry_loss,
    check_reward_model_dir,
    encode_for_reward,
    last_token_index,
    last_token_rewards,
    pad_right,
)
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import read_metrics, save_tiny_reward_model, write
from tests.tiny_cache import shared_tiny_model


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(d) == softplus(-d)


def test_bradley_terry_loss_matches_a_hand_computation():
    chosen, rejected = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 2.0, 3.0])
    got = bradley_terry_loss(chosen, rejected)
    assert got.tolist() == pytest.approx([softplus(-1.0), softplus(2.0), math.log(2.0)], rel=1e-6)
    margin = torch.tensor([0.5, -1.0, 0.0])
    got = bradley_terry_loss(chosen, rejected, margin, center_coef=0.1)
    want = [softplus(-0.5) + 0.1 * 1.0, softplus(1.0) + 0.1 * 4.0, math.log(2.0) + 0.1 * 36.0]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_last_token_index_for_right_and_left_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(left).tolist() == [4, 4, 4]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A (randomly initialised) reward model saved as trainer.type reward saves one."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm") / "reward", tiny_model_dir)


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    convs = [[{"role": "user", "content": f"What is {a} + 2?"}, {"role": "assistant", "content": f"{a} + 2 = {a + 2}"}]
             for a in (3, 17, 123456)]
    rows = [encode_for_reward(tok, c) for c in convs]
    assert len({len(r) for r in rows}) > 1  # padding is really exercised
    alone = torch.cat([last_token_rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                       for r in rows])
    ids, mask = pad_right(rows, tok.pad_token_id)
    right = last_token_rewards(model, ids, mask)
    width = ids.shape[1]
    left_ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    left_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    left = last_token_rewards(model, left_ids, left_mask)
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(left, alone, atol=1e-5)
    # pad == EOS and rows ending in EOS: transformers' own pooling (last token != pad id) moves one
    # token back; ours does not.
    eos = tok.eos_token_id
    rows_eos = [r + [eos] for r in rows]
    model.config.pad_token_id = eos
    ids, mask = pad_right(rows_eos, eos)
    ours = last_token_rewards(model, ids, mask)
    theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    alone = torch.cat([last_token_rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
                       for r in rows_eos])
    assert torch.allclose(ours, alone, atol=1e-5)
    assert not torch.allclose(theirs, alone, atol=1e-3)


def test_scorer_renders_like_reward_training_and_batches_exactly(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    scorer = RewardModelScorer(str(reward_model_dir), "trainer.rewards.0.path", batch_size=2)
    prompts = [[{"role": "user", "content": f"What is {a} + 1?"}] for a in (1, 22, 333)]
    completions = ["1 + 1 = 2", "22 + 1 = 23 I think", "333 + 1 = 334"]
    got = scorer(prompts, completions)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    want = []
    for p, c in zip(prompts, completions, strict=True):
        ids = encode_for_reward(tok, p + [{"role": "assistant", "content": c}])
        want.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert got == pytest.approx(want, abs=1e-5)


def test_reward_model_directory_checks(tiny_model_dir, reward_model_dir, tmp_path):
    from transformers import AutoTokenizer

    with pytest.raises(RecipeError, match="is not a directory"):
        check_reward_model_dir(str(tmp_path / "nope"), "k")
    with pytest.raises(RecipeError, match=r"not a reward model: its config has architectures \[.LlamaForCausalLM.\]"):
        check_reward_model_dir(str(tiny_model_dir), "k")
    # a tokenizer that does not belong to the weights
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ("config.json", "model.safetensors"):
        (mixed / f).write_bytes((reward_model_dir / f).read_bytes())
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    tok.add_tokens([f"<extra_{i}>" for i in range(40)])
    tok.save_pretrained(mixed)
    with pytest.raises(RecipeError, match="tokenizer and weights do not belong together"):
        check_reward_model_dir(str(mixed), "k")
    # a policy rendering conversations with another template
    scorer = RewardModelScorer(str(reward_model_dir), "trainer.rewards.0.path")
    other = AutoTokenizer.from_pretrained(reward_model_dir)
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(RecipeError, match="trained with a different chat template"):
        scorer.check_template(other, "trainer.rewards.0")
    scorer.check_template(AutoTokenizer.from_pretrained(reward_model_dir), "trainer.rewards.0")


def preference_rows(n: int, offset: int = 0) -> str:
    """A preference the tiny model can learn in a few steps: 'yes' beats 'no' after any question."""
    rows = [{"prompt": f"What is {a} + {a % 7}?", "chosen": "yes", "rejected": "no", "margin": 1.0}
            for a in range(offset, offset + n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def reward_recipe(tmp, model_dir, **extra) -> dict:
    write(tmp / "pref_train.jsonl", preference_rows(48))
    write(tmp / "pref_eval.jsonl", preference_rows(16, offset=100))
    recipe = {
        "model": {"name": str(model_dir)},
        "tokenizer": {"chat_template": "chatml", "max_length": 64},
        "data": {"train": [{"path": str(tmp / "pref_train.jsonl"), "format": "preference"}],
                 "eval": [{"path": str(tmp / "pref_eval.jsonl"), "format": "preference"}]},
        "trainer": {"type": "reward"},
        "optim": {"lr": 1e-2},
        "run": {"output_dir": str(tmp / "rm"), "max_steps": 12, "micro_batch_size": 8, "log_every": 1,
                "eval_at_start": True},
    }
    for key, value in extra.items():
        recipe[key] = value
    return recipe


def test_reward_trainer_learns_a_preference_and_saves_a_loadable_model(in_tmp, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    final = run_recipe(recipe_from_dict(reward_recipe(in_tmp, tiny_model_dir)))
    evals = [r for r in read_metrics(in_tmp / "rm") if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[-1]["eval_accuracy"] == 1.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.architectures == ["LlamaForSequenceClassification"]
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in after if k in before)  # full weights trained
    scorer = RewardModelScorer(str(final), "k")
    yes, no = scorer([[{"role": "user", "content": "What is 9 + 9?"}]] * 2, ["yes", "no"])
    assert yes > no


def test_lora_reward_model_trains_its_head_and_loads_back(in_tmp, tiny_model_dir):
    from finetune.models.reward_model import load_trained_reward_model

    recipe = reward_recipe(in_tmp, tiny_model_dir, adapter={"r": 4, "alpha": 8})
    recipe["optim"]["lr"] = 2e-2
    final = run_recipe(recipe_from_dict(recipe))
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    evals = [r for r in read_metrics(in_tmp / "rm") if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.2
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    torch.manual_seed(1)
    a = last_token_rewards(load_trained_reward_model(final), ids, mask)
    torch.manual_seed(2)  # a head initialised at load time instead of read from the adapter would differ
    b = last_token_rewards(load_trained_reward_model(final), ids, mask)
    assert torch.equal(a, b)


def test_margin_column_is_required_when_used_and_format_is_checked(in_tmp, tiny_model_dir):
    recipe = reward_recipe(in_tmp, tiny_model_dir)
    recipe["trainer"]["reward_model"] = {"use_margin": True}
    write(in_tmp / "pref_train.jsonl", preference_rows(4) + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}))
    with pytest.raises(DataError, match=r"pref_train.jsonl:5: reward_model.use_margin is on"):
        run_recipe(recipe_from_dict(recipe))
    recipe = reward_recipe(in_tmp, tiny_model_dir)
    recipe["data"]["train"][0]["format"] = "prompts"
    with pytest.raises(DataError, match="trainer reward reads format 'preference'"):
        run_recipe(recipe_from_dict(recipe))


def test_a_new_head_is_drawn_at_the_reference_scale_and_a_trained_one_is_kept(in_tmp, tiny_model_dir,
                                                                              reward_model_dir):
    from safetensors.torch import load_file

    from finetune.models.reward_model import load_reward_model, score_head

    torch.manual_seed(0)
    model, _ = load_reward_model(recipe_from_dict(reward_recipe(in_tmp, tiny_model_dir)))
    head = score_head(model).weight
    want = 1 / math.sqrt(head.shape[1] + 1)  # lm-human-preferences / N+: N(0, 1/sqrt(d_model + 1))
    assert head.std().item() == pytest.approx(want, rel=0.25)
    # continuing a reward model keeps its trained head (the fixture's head has transformers' 0.02 std)
    model, _ = load_reward_model(recipe_from_dict(reward_recipe(in_tmp, reward_model_dir)))
    assert torch.equal(score_head(model).weight, load_file(reward_model_dir / "model.safetensors")["score.weight"])
