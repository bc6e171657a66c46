"""final/README.md: a Hugging Face model card (valid metadata, the recipe, the final metrics)."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import save_tiny_chat_model, tiny_sft_recipe, write


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("adapter", [None, {"r": 4, "alpha": 8}])
def test_a_finished_run_has_a_model_card(in_tmp, tiny_model_dir, adapter):
    write(tiny_model_dir / "README.md", "---\nlicense: apache-2.0\n---\n# base\n")
    data = tiny_sft_recipe(in_tmp, tiny_model_dir, max_steps=2, eval_every=2)
    data["trainer"]["exact_match_samples"] = 0
    if adapter:
        data["adapter"] = adapter
    recipe = recipe_from_dict(data)
    final = run_recipe(recipe)
    card = ModelCard.load(final / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["library_name"] == ("peft" if adapter else "transformers")
    assert meta["license"] == "apache-2.0"  # read from the base's own card
    assert meta["tags"] == ["finetune", "sft"] + (["lora"] if adapter else [])
    assert "datasets" not in meta  # local files are not Hub datasets
    records = [json.loads(x) for x in (final.parent / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["loss"] for r in records if "loss" in r][-1]
    assert f"| loss | {last_loss:.4g} |" in card.text
    assert "| step | eval_loss" in card.text and "trainer: {type: sft" not in card.text
    assert "```yaml\nmodel:\n  name: " + str(tiny_model_dir) in card.text  # the resolved recipe, rerunnable


def test_hub_datasets_are_listed(in_tmp, tiny_model_dir):
    from finetune.run.model_card import _metadata

    data = tiny_sft_recipe(in_tmp, tiny_model_dir)
    data["data"]["train"].append({"path": "trl-lib/Capybara"})
    meta = _metadata(recipe_from_dict(data), in_tmp)
    assert meta["datasets"] == ["trl-lib/Capybara"]
