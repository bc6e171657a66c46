"""finetune merge: merged logits == base+adapter logits, tied embeddings, modules_to_save, bad input."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from finetune.data.tokenizer import resolve_chat_template
from finetune.models import merge
from finetune.models.merge import MergeError, MergeVerificationError, add_merge_arguments, cmd_merge, merge_adapter
from finetune.recipe.schema import recipe_from_dict
from finetune.run.launch import run_recipe
from tests.test_adapter import lora_recipe, make_base

IDS = torch.tensor([[1, 5, 60, 61, 62, 63, 7, 30, 2]])


def perturbed_adapter(base: Path, out: Path, tok: Path | None = None, **lora) -> PeftModel:
    """A LoRA adapter with random non-zero A and B (and perturbed extra trained weights), saved to out."""
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:  # modules_to_save copies, trainable token rows
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out)
    if tok is not None:
        tokenizer = AutoTokenizer.from_pretrained(tok)
        tokenizer.chat_template = resolve_chat_template(tokenizer, "chatml")  # no added tokens: same vocab
        tokenizer.save_pretrained(out)
    return model.eval()


def tiny_base(path: Path, tied: bool = False, hidden: int = 32, vocab: int = 64) -> Path:
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=vocab,
                                  tie_word_embeddings=tied)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(base dir, adapter dir, the peft model) shared read-only by the tests of this module."""
    tmp = tmp_path_factory.mktemp("lora")
    base, tok = make_base(tmp)
    model = perturbed_adapter(base, tmp / "adapter", tok)
    return base, tmp / "adapter", model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(".tmp-merge-*")) and not list(out.parent.glob(".old-merge-*"))


def test_merge_round_trip_fp32(lora, tmp_path):
    base, adapter, peft_model = lora
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    out = tmp_path / "merged"
    assert report.max_abs_logit_diff <= 1e-5 and report.adapter_effect > 0.05  # a real adapter, merged exactly
    assert report.base == str(base) and report.dtype == "fp32" and report.tokenizer_source.startswith("adapter")

    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), logits(peft_model), atol=1e-5, rtol=0)
    assert (logits(merged) - logits(peft_model.get_base_model().__class__.from_pretrained(base))).abs().max() > 0.05
    prompt = torch.tensor([[3, 17, 42, 8]])
    gen = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert merged.generate(prompt, **gen).tolist() == peft_model.generate(input_ids=prompt, **gen).tolist()

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "merge_report.json",
            "README.md"} <= names and "adapter_config.json" not in names
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["base"] == str(base) and saved["max_abs_logit_diff"] == report.max_abs_logit_diff
    assert str(base) in (out / "README.md").read_text()
    assert report.size_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert any(line.startswith("verified   max |logit diff|") for line in report.lines())


def test_bf16_merge_is_sharded_and_within_tolerance(lora, tmp_path):
    _, adapter, peft_model = lora
    report = merge_adapter(adapter, tmp_path / "m", dtype="bf16", max_shard_size="40KB")
    out = tmp_path / "m"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()
    with safe_open(shards[0], "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    assert 0 < report.max_abs_logit_diff <= report.tolerance and report.dtype == "bf16"
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert (logits(merged) - logits(peft_model)).abs().max() < 0.05


@pytest.mark.parametrize("tied, extra", [
    (True, {}),
    (True, {"modules_to_save": ["embed_tokens"]}),
    (False, {"modules_to_save": ["lm_head"]}),
    (True, {"trainable_token_indices": [60, 61, 62]}),
    (False, {"use_dora": True, "use_rslora": True}),
])
def test_tied_embeddings_and_modules_to_save(tmp_path, tied, extra):
    """Also DoRA/rsLoRA: their magnitude and scaling must be folded in as well."""
    base = tiny_base(tmp_path / "base", tied=tied)
    peft_model = perturbed_adapter(base, tmp_path / "adapter", **extra)
    report = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(merged), logits(peft_model), atol=1e-4, rtol=0)
    assert report.tokenizer_source is None and any("no tokenizer" in n for n in report.notes)
    still_tied = merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    if "modules_to_save" in extra:
        # the trained copy is the merged model's layer
        name = extra["modules_to_save"][0]
        trained = getattr(peft_model.base_model.model.model if name == "embed_tokens" else peft_model.base_model.model,
                          name).modules_to_save["default"].weight
        layer = merged.get_input_embeddings() if name == "embed_tokens" else merged.get_output_embeddings()
        torch.testing.assert_close(layer.weight, trained, atol=0, rtol=0)
        assert not still_tied  # one half of a tied pair trained alone: the merge saved both
        if tied:
            assert any("saved untied" in n for n in report.notes)
    else:
        assert still_tied == tied and merged.config.tie_word_embeddings == tied


@pytest.mark.parametrize("quantize, tied", [(None, True), ("4bit", False)])
def test_merge_a_trained_run_with_added_tokens(in_tmp, quantize, tied):
    from finetune.models.loading import check_quantization_supported

    base, tok = make_base(in_tmp, tied=tied)
    recipe = recipe_from_dict(lora_recipe(in_tmp, base, tok, model={"quantize": quantize}, max_steps=3))
    if quantize:
        check_quantization_supported(recipe)  # bitsandbytes 0.50 quantizes on CPU (see test_adapter.py)
    final = run_recipe(recipe)
    report = merge_adapter(final, in_tmp / "merged", dtype="fp32")
    n = len(AutoTokenizer.from_pretrained(final))
    merged = AutoModelForCausalLM.from_pretrained(in_tmp / "merged")
    assert merged.config.vocab_size == n == len(AutoTokenizer.from_pretrained(tok)) + 2
    reference_base = AutoModelForCausalLM.from_pretrained(base)  # the unquantized base, as the merge used
    reference_base.resize_token_embeddings(n, mean_resizing=False)
    reference = PeftModel.from_pretrained(reference_base, final).eval()
    ids = torch.tensor([[n - 2, 5, n - 1, 9, 11, n - 2]])  # the added ChatML tokens
    torch.testing.assert_close(logits(merged, ids), logits(reference, ids), atol=1e-5, rtol=0)
    assert report.max_abs_logit_diff <= 1e-5
    assert report.trained_quantization == quantize
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    if quantize:
        assert "trained on the base quantized to 4bit" in (in_tmp / "merged" / "README.md").read_text()
        assert json.loads((in_tmp / "merged" / "merge_report.json").read_text())["trained_quantization"] == "4bit"


def test_refuses_a_non_empty_out_dir_unless_forced(lora, tmp_path):
    _, adapter, _ = lora
    out = tmp_path / "out"
    out.mkdir()
    merge_adapter(adapter, out)  # an empty existing dir is fine
    stamp = (out / "config.json").stat().st_mtime_ns
    with pytest.raises(MergeError, match="exists and is not empty; pass --force"):
        merge_adapter(adapter, out)
    assert (out / "config.json").stat().st_mtime_ns == stamp
    merge_adapter(adapter, out, dtype="fp16", force=True)
    assert json.loads((out / "merge_report.json").read_text())["dtype"] == "fp16"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(MergeError, match="holds files but no model"):
        merge_adapter(adapter, notes, force=True)
    assert (notes / "todo.txt").read_text() == "mine"


def test_failed_verification_leaves_nothing(lora, tmp_path, monkeypatch):
    _, adapter, _ = lora
    monkeypatch.setattr(merge, "TOLERANCE", {"float32": -1.0})
    with pytest.raises(MergeVerificationError, match="differ from base\\+adapter"):
        merge_adapter(adapter, tmp_path / "out", dtype="fp32")
    assert_nothing_written(tmp_path / "out")


def _bad_inputs(tmp: Path, lora) -> dict:
    base, adapter, _ = lora
    full = tiny_base(tmp / "full")
    other = tiny_base(tmp / "other", hidden=48)
    moved = tmp / "moved"
    shutil.copytree(adapter, moved)
    cfg = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": str(tmp / "gone")}))
    quantized = tmp / "quantized"
    shutil.copytree(base, quantized)
    qcfg = json.loads((quantized / "config.json").read_text())
    qcfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(qcfg))
    return {
        "missing": (dict(adapter_dir=tmp / "nope"), "does not exist"),
        "not an adapter": (dict(adapter_dir=tmp), "not a PEFT adapter: no adapter_config.json"),
        "a full model": (dict(adapter_dir=full), "holds a full model: nothing to merge"),
        "shapes": (dict(adapter_dir=adapter, base=str(other)), "does not fit base .*size mismatch"),
        "base gone": (dict(adapter_dir=moved), "cannot load the base model config .*; pass --base"),
        "pre-quantized base": (dict(adapter_dir=adapter, base=str(quantized)), "stored quantized \\(bitsandbytes\\)"),
        "dtype": (dict(adapter_dir=adapter, dtype="int4"), "--dtype 'int4': expected one of fp32, bf16, fp16"),
        "out is the adapter": (dict(adapter_dir=adapter, out_dir=adapter, force=True), "is or contains"),
        # under a file, and on a file system nobody writes (root, as in CI, ignores mode bits)
        "out under a file": (dict(adapter_dir=adapter, out_dir=quantized / "config.json" / "merged"),
                             "config.json exists and is not a directory"),
        "out not writable": (dict(adapter_dir=adapter, out_dir=Path("/proc/finetune-merged")), "is not writable"),
    }


def test_bad_input_is_one_line_and_writes_nothing(lora, tmp_path):
    for what, (kwargs, match) in _bad_inputs(tmp_path, lora).items():
        out = kwargs.pop("out_dir", tmp_path / "merged")
        with pytest.raises(MergeError, match=match) as e:
            merge_adapter(out_dir=out, **kwargs)
        assert "\n" not in str(e.value), what
        if out != lora[1]:
            assert_nothing_written(out)
    assert (lora[1] / "adapter_config.json").is_file()


def test_explicit_base_elsewhere_is_used_with_a_warning(lora, tmp_path):
    base, adapter, peft_model = lora
    copy = tmp_path / "base-copy"
    shutil.copytree(base, copy)
    report = merge_adapter(adapter, tmp_path / "m", base=str(copy))
    assert report.base == str(copy) and report.recorded_base == str(base)
    assert any(n.startswith("warning: base") for n in report.notes)
    assert f"(adapter recorded {base})" in report.lines()[1]
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), logits(peft_model),
                               atol=1e-5, rtol=0)


def parse(argv: list[str]):
    parser = argparse.ArgumentParser(prog="finetune merge")
    add_merge_arguments(parser)
    return parser.parse_args(argv)


def test_cmd_merge_exit_codes(lora, tmp_path, capsys):
    _, adapter, _ = lora
    assert cmd_merge(parse([str(tmp_path / "missing"), str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune: error: adapter dir") and err.count("\n") == 1
    assert_nothing_written(tmp_path / "out")

    assert cmd_merge(parse([str(adapter), str(tmp_path / "out"), "--dtype", "fp32"])) == 0
    printed = capsys.readouterr().out
    assert "verified   max |logit diff|" in printed and f"output     {tmp_path / 'out'}" in printed
    args = parse([str(adapter), str(tmp_path / "out"), "--force", "--base", str(lora[0])])
    assert args.force and args.dtype is None and args.max_shard_size == "5GB"
