"""Coming from TRL / Axolotl: their key names get our key with the value translated, and their
config files are translated by `finetune validate`."""

from __future__ import annotations

import pytest
import yaml

from finetune.cli.main import main
from finetune.recipe.schema import load_recipe, recipe_from_dict
from tests.conftest import write

BASE = """model: {name: org/model}
data: {train: [{path: data.jsonl}]}
trainer: {type: sft}
run: {output_dir: out}
"""


@pytest.fixture
def recipe_file(in_tmp):
    write(in_tmp / "data.jsonl", '{"messages": []}\n')
    return write(in_tmp / "r.yaml", BASE)


@pytest.mark.parametrize("override, hint", [
    ("optim.learning_rate=1e-4", "did you mean optim.lr=1e-4?"),
    ("learning_rate=0.0001", "did you mean optim.lr=0.0001?"),
    ("run.per_device_train_batch_size=8", "did you mean run.micro_batch_size=8?"),
    ("gradient_accumulation_steps=4", "did you mean run.grad_accum=4?"),
    ("bf16=true", "did you mean run.precision=bf16?"),
    ("lora_r=8", "did you mean adapter.r=8?"),
    ("sequence_len=4096", "did you mean tokenizer.max_length=4096?"),
    ("num_train_epochs=3", "did you mean run.epochs=3?"),
    ("optimizer=paged_adamw_8bit", "did you mean optim.name=adamw_8bit?"),
])
def test_peer_override_names_get_our_key_and_value(recipe_file, capsys, override, hint):
    assert main(["validate", str(recipe_file), override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(hint + ")") and "\n" not in err, err


def test_peer_key_in_the_file_names_line_and_translation(in_tmp, recipe_file):
    write(recipe_file, BASE.replace("run: {output_dir: out}", "run:\n  output_dir: out\n  num_train_epochs: 2"))
    with pytest.raises(Exception, match=r"r\.yaml:6: unknown key 'run\.num_train_epochs' "
                                        r"\(did you mean run\.epochs=2\?\)"):
        load_recipe(recipe_file)


def test_a_near_spelling_of_our_own_key_still_suggests_ours(recipe_file, capsys):
    assert main(["validate", str(recipe_file), "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'?" in capsys.readouterr().err


def test_peer_flags_get_the_override_to_use(recipe_file, capsys):
    for argv, hint in ((["--learning_rate", "1e-4"], "unknown flag --learning_rate (did you mean optim.lr=1e-4?)"),
                       (["--bf16"], "unknown flag --bf16 (did you mean run.precision=bf16?)"),
                       (["--lora_r=8"], "unknown flag --lora_r (did you mean adapter.r=8?)")):
        with pytest.raises(SystemExit) as e:  # argparse's usage error: exit 2
            main(["run", str(recipe_file), *argv])
        assert e.value.code == 2 and hint in capsys.readouterr().err
    assert not (recipe_file.parent / "out").exists()


AXOLOTL = """base_model: meta-llama/Llama-3.2-1B
load_in_4bit: true
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_target_linear: true
datasets:
  - path: data.jsonl
    type: chat_template
    field_messages: conversations
sequence_len: 2048
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 1
learning_rate: 0.0002
optimizer: paged_adamw_8bit
bf16: auto
output_dir: ./outputs/qlora-out
wandb_project: demo
"""

TRL = """model_name_or_path: Qwen/Qwen2.5-0.5B
dataset_name: trl-lib/Capybara
learning_rate: 2.0e-5
per_device_train_batch_size: 8
gradient_accumulation_steps: 2
num_train_epochs: 1
max_length: 1024
bf16: true
use_peft: true
lora_r: 16
output_dir: Qwen2-SFT
push_to_hub: true
"""


@pytest.mark.parametrize("kind, text, expect, unmapped", [
    ("Axolotl", AXOLOTL, {"model": {"name": "meta-llama/Llama-3.2-1B", "quantize": "4bit"},
                          "adapter": {"type": "lora", "r": 32, "alpha": 16, "target_modules": "all-linear"},
                          "data": {"train": [{"path": "data.jsonl", "format": "messages",
                                              "columns": {"messages": "conversations"}}], "packing": True},
                          "tokenizer": {"max_length": 2048},
                          "optim": {"lr": 0.0002, "name": "adamw_8bit"},
                          "run": {"micro_batch_size": 2, "grad_accum": 4, "epochs": 1, "precision": "bf16",
                                  "output_dir": "./outputs/qlora-out"}}, "wandb_project"),
    ("TRL", TRL, {"model": {"name": "Qwen/Qwen2.5-0.5B"}, "adapter": {"type": "lora", "r": 16},
                  "data": {"train": [{"path": "trl-lib/Capybara"}]}, "tokenizer": {"max_length": 1024},
                  "optim": {"lr": 2e-5},
                  "run": {"micro_batch_size": 8, "grad_accum": 2, "epochs": 1, "precision": "bf16",
                          "output_dir": "Qwen2-SFT"}}, "push_to_hub"),
])
def test_validate_translates_a_peer_config(in_tmp, capsys, kind, text, expect, unmapped):
    path = write(in_tmp / "peer.yml", text)
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    recipe = yaml.safe_load(out)
    for section, values in expect.items():
        for key, value in values.items():
            assert recipe[section][key] == value, (section, key, recipe[section])
    recipe_from_dict(recipe)  # a valid recipe as printed
    assert f"no equivalent for: {unmapped}" in err and f"is an {kind} config, not a recipe" in err
    # `finetune run` on it: one line, exit 2, nothing written.
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip().endswith("prints the equivalent recipe")
