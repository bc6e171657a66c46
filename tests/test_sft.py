"""SFT: a real run on a tiny model, packing/padding-free equivalence at the trainer level, the audit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli.main import main
from finetune.errors import DataError
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.conftest import read_metrics, tiny_sft_recipe, write
from tests.tiny_cache import shared_tiny_model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return shared_tiny_model(tmp_path_factory)


def test_sft_run_trains_every_weight_and_lowers_loss(in_tmp, tiny_model_dir):
    final = run_recipe(recipe_from_dict(tiny_sft_recipe(in_tmp, tiny_model_dir, max_steps=12)))
    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(final / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    records = read_metrics(in_tmp / "sft")
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert "eval_exact_match" in records[-1]
    assert (final / "chat_template.jinja").is_file()


def first_step_loss(tmp, model_dir, micro_batch_size=8, **data) -> float:
    recipe = tiny_sft_recipe(tmp, model_dir, max_steps=1, log_every=1)
    recipe["data"].update(data, shuffle=False)
    recipe["data"]["train"][0]["max_samples"] = 8
    recipe["tokenizer"]["max_length"] = 512  # all 8 samples fit one packed row
    recipe["run"]["output_dir"] = str(tmp / f"run-{len(list(tmp.iterdir()))}")
    recipe["run"]["micro_batch_size"] = micro_batch_size
    out = run_recipe(recipe_from_dict(recipe)).parent
    return read_metrics(out)[0]["loss"]


def test_padded_padding_free_and_packed_give_the_same_loss(in_tmp, tiny_model_dir):
    padded = first_step_loss(in_tmp, tiny_model_dir, padding_free=False)
    flat = first_step_loss(in_tmp, tiny_model_dir, padding_free=True)
    packed = first_step_loss(in_tmp, tiny_model_dir, micro_batch_size=1, packing=True)
    assert flat == pytest.approx(padded, rel=1e-4)
    assert packed == pytest.approx(padded, rel=1e-4)


def test_data_json_audit_marks_answers_and_stop_tokens(capsys, in_tmp, tiny_model_dir):
    path = write(in_tmp / "r.yaml", json.dumps(tiny_sft_recipe(in_tmp, tiny_model_dir)))
    assert main(["data", str(path), "--json", "--samples", "5"]) == 0
    from transformers import AutoTokenizer

    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 5
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels_mask"]) == len(row["tokens"])
        trained = "".join(t for t, m in zip(row["tokens"], row["labels_mask"], strict=True) if m)
        # every assistant reply is trained together with its <|im_end|>, nothing else is
        assert trained.count("<|im_end|>") == sum(
            1 for i, t in enumerate(row["input_ids"]) if t == end and row["labels_mask"][i])
        assert "user" not in trained and "<|im_start|>" not in trained
        assert trained.endswith("<|im_end|>") and " = " in trained


def test_audit_fails_when_stop_token_is_not_trained(capsys, in_tmp, tiny_model_dir):
    recipe = tiny_sft_recipe(in_tmp, tiny_model_dir)
    # A template with no end-of-turn token: nothing would teach the model to stop.
    recipe["tokenizer"]["chat_template"] = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    path = write(in_tmp / "r.yaml", json.dumps(recipe))
    assert main(["data", str(path)]) == 2
    assert "not a stop token" in capsys.readouterr().err


def test_bad_rows_name_file_and_line(capsys, in_tmp, tiny_model_dir):
    bad = write(in_tmp / "bad.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n"
                + json.dumps({"messages": [{"role": "human", "content": "hi"}]}) + "\n")
    recipe = tiny_sft_recipe(in_tmp, tiny_model_dir)
    recipe["data"]["train"] = [{"path": str(bad), "format": "messages"}]
    path = write(in_tmp / "r.yaml", json.dumps(recipe))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "human" in err
    assert not (in_tmp / "sft").exists()


def test_missing_column_lists_present_ones(in_tmp, tiny_model_dir):
    bad = write(in_tmp / "bad.jsonl", json.dumps({"dialog": []}) + "\n")
    recipe = tiny_sft_recipe(in_tmp, tiny_model_dir)
    recipe["data"]["train"] = [{"path": str(bad), "format": "messages"}]
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing column 'messages'.*present: dialog"):
        run_recipe(recipe_from_dict(recipe))


def test_all_samples_too_long_is_an_error(in_tmp, tiny_model_dir):
    recipe = tiny_sft_recipe(in_tmp, tiny_model_dir)
    recipe["tokenizer"].update(max_length=4, overflow="drop")
    with pytest.raises(DataError, match="no sample has a trained token left"):
        run_recipe(recipe_from_dict(recipe))
