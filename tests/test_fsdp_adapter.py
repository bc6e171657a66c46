"""launch.strategy fsdp with a LoRA adapter: FSDP2 units mixing the frozen base and trained
adapter weights. Two sharded processes equal one plain process, the checkpoints hold only the
adapter's shards (the frozen base comes from model.name again on resume, as unsharded adapter
checkpoints do), and final/ is the adapter `finetune merge` folds into its base.
(A file of its own: `make test` runs files in parallel, and tests/test_fsdp.py is a minute already.)"""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from finetune.cli.main import main
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from finetune.train import checkpoint
from tests.conftest import save_tiny_chat_model, write
from tests.test_fsdp import assert_close_weights, launch, recipe

pytestmark = pytest.mark.slow  # one 2-process launch


def lora(tmp, model_dir, name: str, micro: int, accum: int, **run) -> dict:
    data = recipe(tmp, model_dir, name, micro, accum, **run)
    data["adapter"] = {"r": 4, "alpha": 8, "target_modules": "all-linear"}
    return data


def test_lora_under_fsdp_equals_one_process_and_merges(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_chat_model(tmp_path / "model")
    proc = launch(write(tmp_path / "fsdp.yaml", json.dumps(lora(tmp_path, model_dir, "fsdp", 2, 2, save_every=2))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(fsdp," in proc.stderr
    run_recipe(recipe_from_dict(lora(tmp_path, model_dir, "one", 8, 1)))
    adapter = lambda name: load_file(tmp_path / name / "final" / "adapter_model.safetensors")  # noqa: E731
    assert_close_weights(adapter("fsdp"), adapter("one"))

    ckpt = checkpoint.latest_checkpoint(tmp_path / "fsdp")
    meta = FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata
    weights = [k for k in meta if k.startswith("model.")]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights[:5]

    assert main(["merge", str(tmp_path / "fsdp" / "final"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.architectures == ["LlamaForCausalLM"]
