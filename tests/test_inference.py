"""finetune.infer.inference / generate_cli: KV cache, batching, adapters unmerged == merged, chat REPL, bad input."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from finetune.errors import UserError
from finetune.infer import inference
from finetune.infer.generate_cli import add_chat_arguments, add_generate_arguments, cmd_chat, cmd_generate
from finetune.infer.inference import Settings, StreamPrinter, generate, load_for_inference, resolve_model_ref
from finetune.models.merge import merge_adapter
from tests.conftest import write
from tests.test_adapter import make_base
from tests.test_merge import perturbed_adapter
from tests.tiny_cache import shared_tiny_model

PROMPTS = ["What is 2 + 3?", "hi", [{"role": "user", "content": "What is 11 + 7? Answer with one number."}]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return shared_tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_for_inference(str(model_dir))


def run(cmd, add, argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add(parser)
    rc = cmd(parser.parse_args(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert len(lines) == 1 and all(f in lines[0] for f in fragments), err
    assert "Traceback" not in err


def test_kv_cache_and_left_padded_batches_give_the_same_greedy_tokens(lm):
    settings = Settings(max_new_tokens=12)
    cached = generate(lm, PROMPTS, settings)
    uncached = generate(lm, PROMPTS, Settings(max_new_tokens=12, use_cache=False))
    one_by_one = [generate(lm, [p], settings)[0] for p in PROMPTS]
    assert len({len(inference.encode(lm.tokenizer, p, raw=False)) for p in PROMPTS}) == 3  # padding is exercised
    assert all(c.tokens == 12 and not c.stopped for c in cached)  # random weights never stop: 12 tokens compared
    assert [c.ids for c in cached] == [c.ids for c in uncached] == [c.ids for c in one_by_one]


def test_chat_prompts_use_the_template_and_stop_tokens(lm):
    ids = inference.encode(lm.tokenizer, "hi", raw=False, system="Be brief.")
    text = lm.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert inference.stop_ids(lm) == [lm.tokenizer.eos_token_id, lm.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # A completion cut at a stop token: stopped, the stop token counted but not in the text.
    im_end = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    c = inference._completion(lm.tokenizer, "p", [25, 289, im_end, 0, 0], inference.stop_ids(lm))
    assert c.stopped and c.tokens == 3 and c.ids == [25, 289, im_end] and "im_end" not in c.text


def test_sampling_is_seeded(lm):
    s = Settings(max_new_tokens=8, temperature=1.0, seed=3)
    a, b = generate(lm, ["hi", "hi"], s), generate(lm, ["hi", "hi"], s)
    assert [c.ids for c in a] == [c.ids for c in b]


def test_adapter_unmerged_generates_what_the_merged_model_generates(tmp_path):
    base, tok = make_base(tmp_path)
    perturbed_adapter(base, tmp_path / "adapter", tok)
    adapted = load_for_inference(str(tmp_path / "adapter"))
    assert adapted.ref.kind == "adapter" and adapted.ref.base == str(base)
    assert any("lora_A" in n for n, _ in adapted.model.named_parameters())  # base + adapter, not merged
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    merged = load_for_inference(str(tmp_path / "merged"))
    settings = Settings(max_new_tokens=10)
    got = generate(adapted, PROMPTS[:2], settings)
    assert [c.ids for c in got] == [c.ids for c in generate(merged, PROMPTS[:2], settings)]
    ids = torch.tensor([inference.encode(adapted.tokenizer, "hi", raw=False)])
    with torch.no_grad(), adapted.model.disable_adapter():
        plain = adapted.model(input_ids=ids).logits
    assert (adapted.model(input_ids=ids).logits - plain).abs().max() > 1e-3  # the adapter is really applied


def test_run_dir_uses_final_and_checkpoint_dir_uses_model_and_tokenizer(model_dir, tmp_path):
    shutil.copytree(model_dir, tmp_path / "run" / "final")
    write(tmp_path / "run" / "recipe.yaml", "trainer: {type: sft}\n")
    ref = resolve_model_ref(str(tmp_path / "run"))
    assert ref.path == str(tmp_path / "run" / "final") and ref.run_dir == tmp_path / "run"
    assert resolve_model_ref(str(tmp_path / "run" / "final")).run_dir == tmp_path / "run"
    step = tmp_path / "run" / "checkpoints" / "step-4"
    shutil.copytree(model_dir, step / "model")
    shutil.copytree(model_dir, step / "tokenizer")
    (step / "model" / "tokenizer.json").unlink()
    ref = resolve_model_ref(str(step))
    assert (ref.path, ref.tokenizer_path) == (str(step / "model"), str(step / "tokenizer"))
    assert ref.run_dir == tmp_path / "run"


def test_generate_cli_json_file_batched(model_dir, tmp_path, capsys):
    rows = [{"prompt": "What is 2 + 3?"}, {"prompt": [{"role": "user", "content": "hi"}], "answer": "x"},
            {"prompt": "hey", "system": "Be brief."}]
    write(tmp_path / "p.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(cmd_generate, add_generate_arguments,
                       [str(model_dir), "--file", str(tmp_path / "p.jsonl"), "--json", "--max-new-tokens", "5",
                        "--batch-size", "2"], capsys)
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == [r["prompt"] for r in rows]
    assert all(set(r) == {"prompt", "completion", "tokens", "stopped"} and r["tokens"] == 5 for r in records)
    lm = load_for_inference(str(model_dir))
    expected = generate(lm, ["What is 2 + 3?"], Settings(max_new_tokens=5))[0].text
    assert records[0]["completion"] == expected


def test_generate_cli_raw_prompt(model_dir, capsys):
    rc, out, err = run(cmd_generate, add_generate_arguments,
                       [str(model_dir), "--prompt", "3 + 4 =", "--raw", "--max-new-tokens", "4"], capsys)
    assert rc == 0, err
    lm = load_for_inference(str(model_dir), raw=True)
    assert out == generate(lm, ["3 + 4 ="], Settings(max_new_tokens=4), raw=True)[0].text + "\n"


def test_chat_keeps_the_conversation_resets_and_exits_on_eof(model_dir, lm, monkeypatch, capsys):
    s = Settings(max_new_tokens=6)
    first = generate(lm, [[{"role": "user", "content": "What is 2 + 3?"}]], s)[0].text
    history = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And 4 + 4?"}]
    second = generate(lm, [history], s)[0].text
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 2 + 3?\nAnd 4 + 4?\n/reset\nWhat is 2 + 3?\n"))
    rc, out, err = run(cmd_chat, add_chat_arguments, [str(model_dir), "--max-new-tokens", "6"], capsys)
    assert rc == 0, err  # EOF ends the session cleanly
    assert out.splitlines() == [first, second, first]  # history kept, then forgotten by /reset
    assert "(conversation reset)" in err


def test_chat_exit_command_stops_reading(model_dir, lm, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\nnever read\n"))
    rc, out, _ = run(cmd_chat, add_chat_arguments, [str(model_dir), "--max-new-tokens", "3"], capsys)
    assert rc == 0 and len(out.splitlines()) == 1


def test_stream_printer_writes_text_as_tokens_arrive(lm):
    out = io.StringIO()
    printer = StreamPrinter(lm.tokenizer, out)
    printer.put(torch.tensor([[1, 2]]))  # the prompt: skipped
    ids = lm.tokenizer("What is 2 + 3? 5", add_special_tokens=False)["input_ids"]
    for i in ids[:-1]:
        printer.put(torch.tensor([i]))
    assert out.getvalue().startswith("What is")  # whole words appear before generation ends
    printer.put(torch.tensor([ids[-1]]))
    printer.end()
    assert out.getvalue() == "What is 2 + 3? 5\n"


# ---------------------------------------------------------------- bad input: exit 2, one line, no weights


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(inference, "load_model", refuse)


def test_adapter_without_reachable_base_names_the_base(tmp_path, capsys, no_weights):
    adapter = write(tmp_path / "adapter" / "adapter_config.json",
                    json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM",
                                "base_model_name_or_path": str(tmp_path / "gone" / "base")})).parent
    with pytest.raises(UserError, match="base model .*gone/base.* cannot be loaded.*--base"):
        resolve_model_ref(str(adapter))
    rc, _, err = run(cmd_generate, add_generate_arguments, [str(adapter), "--prompt", "hi"], capsys)
    assert_one_line_error(rc, err, "gone/base")


def test_run_dir_without_final_points_at_its_checkpoint(tmp_path, capsys, no_weights):
    write(tmp_path / "run" / "metrics.jsonl", "")
    (tmp_path / "run" / "checkpoints" / "step-8").mkdir(parents=True)
    rc, _, err = run(cmd_generate, add_generate_arguments, [str(tmp_path / "run"), "--prompt", "hi"], capsys)
    assert_one_line_error(rc, err, "has no final/", "step-8")


@pytest.mark.parametrize(("argv", "fragment"), [
    (["--prompt", "hi", "--top-p", "0.9"], "--temperature"),
    (["--prompt", "hi", "--temperature", "0.7", "--top-p", "1.5"], "--top-p 1.5"),
    (["--file", "MISSING.jsonl"], "MISSING.jsonl"),
])
def test_bad_flags_and_files(model_dir, capsys, no_weights, argv, fragment):
    rc, _, err = run(cmd_generate, add_generate_arguments, [str(model_dir), *argv], capsys)
    assert_one_line_error(rc, err, fragment)


def test_prompts_file_problems_name_the_row(model_dir, tmp_path, capsys, no_weights):
    write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n{"question": "where is the prompt?"}\n')
    rc, _, err = run(cmd_generate, add_generate_arguments, [str(model_dir), "--file", str(tmp_path / "p.jsonl")],
                     capsys)
    assert_one_line_error(rc, err, "p.jsonl:2", "'prompt'", "question")
    write(tmp_path / "m.jsonl", '{"prompt": [{"role": "user", "content": "hi"}]}\n')
    rc, _, err = run(cmd_generate, add_generate_arguments,
                     [str(model_dir), "--file", str(tmp_path / "m.jsonl"), "--raw"], capsys)
    assert_one_line_error(rc, err, "m.jsonl:1", "--raw needs a string prompt")


def test_model_without_chat_template_needs_raw(model_dir, tmp_path, capsys, no_weights):
    plain = shutil.copytree(model_dir, tmp_path / "plain")
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    rc, _, err = run(cmd_generate, add_generate_arguments, [str(plain), "--prompt", "hi"], capsys)
    assert_one_line_error(rc, err, "no chat template", "--raw")


@pytest.mark.parametrize(("ref", "fragment"), [
    ("./no/such/dir", "does not exist"),
    ("no-such-org/no-such-model", "cannot be loaded as a Hub model"),
])
def test_missing_model_references(ref, fragment, capsys, no_weights):
    rc, _, err = run(cmd_generate, add_generate_arguments, [ref, "--prompt", "hi"], capsys)
    assert_one_line_error(rc, err, fragment)
