"""Reasoning-model chat templates train by default: masks equal trl's training twins, every
trained turn ends on a real stop token, reasoning arrives through any field, and a tiny SFT run.

Each family's real template comes from trl's chat_templates folder, on a BPE tokenizer trained here
with the family's special tokens. The reference mask is the twin's ``{% generation %}`` blocks via
``apply_chat_template(return_assistant_tokens_mask=True)``, trimmed by our documented whitespace
convention (tests/test_tokenizer.py: only whitespace at block edges differs).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pytest

from finetune.cli.main import main
from finetune.data.reasoning import split_reasoning, training_twin
from finetune.data.stops import check_generation_prompt
from finetune.data.tokenizer import (
    IGNORE_INDEX,
    UnstableTemplateError,
    encode_chat,
    encode_chat_turns,
    stop_token_ids,
    train_bpe_tokenizer,
)
from tests.conftest import TINY_LLAMA, save_tiny_chat_model, tiny_sft_recipe, write
from tests.test_tokenizer import CALL, CORPUS, DEEPSEEK, TOOLS, UNSTABLE, _trl, trained_texts, trim_marker_mask

IM = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")


@dataclass(frozen=True)
class Family:
    specials: tuple[str, ...]
    bos: str
    eos: str
    field: str | None  # where the template reads reasoning; None: inline <think> in the content
    stops: tuple[str, ...]  # end-of-turn tokens a trained turn must end on
    tools: bool = False
    keeps_reasoning: bool = True  # DeepSeek-V3 (a chat, not a reasoning model): its twin drops it too


FAMILIES = {
    "qwen3": Family(IM, "<|endoftext|>", "<|im_end|>", "reasoning_content", ("<|im_end|>",), tools=True),
    "deepseek_r1_distill": Family(DEEPSEEK, DEEPSEEK[0], DEEPSEEK[1], None, (DEEPSEEK[1],)),
    "deepseekv3": Family(DEEPSEEK, DEEPSEEK[0], DEEPSEEK[1], None, (DEEPSEEK[1],), keeps_reasoning=False),
    "gptoss": Family(
        ("<|startoftext|>", "<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"),
        "<|startoftext|>", "<|return|>", "thinking", ("<|return|>", "<|end|>", "<|call|>"), tools=True),
    "glm4moe": Family(
        ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"),
        "<|endoftext|>", "<|endoftext|>", "reasoning_content", ("<|user|>", "<|observation|>"), tools=True),
    "nemotron_3_nano": Family(IM, "<|endoftext|>", "<|im_end|>", "reasoning_content", ("<|im_end|>",)),
}
REASONS = ["Two and two make four", "France has Paris on the Seine", ""]


@functools.cache
def tokenizer_for(name: str):
    f = FAMILIES[name]
    return train_bpe_tokenizer(CORPUS, 400, special_tokens=f.specials, chat_template=_trl(name),
                               bos_token=f.bos, eos_token=f.eos)


def conversation(field: str | None, reasons: list[str]) -> list[dict]:
    """system + three user/assistant turns; a non-empty reason goes into ``field`` (None: inline)."""
    answers = ["Four.", "Paris, a city on the Seine.", "You are welcome."]
    questions = ["What is two plus two?", "And the capital of France?", "Thanks!"]
    out = [{"role": "system", "content": "You are terse."}]
    for q, a, r in zip(questions, answers, reasons, strict=True):
        reply = {"role": "assistant", "content": a}
        if r and field is None:
            reply["content"] = f"<think>\n{r}\n</think>\n\n{a}"
        elif r:
            reply[field] = r
        out += [{"role": "user", "content": q}, reply]
    return out


def other_form(field: str | None) -> str | None:
    """A reasoning form the template does not read, to check it is moved where it does."""
    return {"reasoning_content": "thinking", "thinking": None, None: "reasoning_content"}[field]


CASES = {"none": ["", "", ""], "all": REASONS[:2] + ["You are thanked"], "some": REASONS}


@pytest.mark.parametrize("reasons", sorted(CASES))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_masks_equal_trl_training_twin(name, reasons):
    tok, f = tokenizer_for(name), FAMILIES[name]
    twin = training_twin(tok.chat_template)[1]
    reference = conversation(f.field, CASES[reasons])
    ref = tok.apply_chat_template(reference, chat_template=twin, return_dict=True, return_assistant_tokens_mask=True)
    for given in (reference, conversation(other_form(f.field), CASES[reasons])):
        out = encode_chat(tok, given)
        assert out["input_ids"] == list(ref["input_ids"]), "reasoning must reach the field the template reads"
        ours = [int(label != IGNORE_INDEX) for label in out["labels"]]
        assert ours == trim_marker_mask(tok, out["input_ids"], list(ref["assistant_masks"]))
        texts = trained_texts(tok, out)
        assert len(texts) == 3
        assert not f.keeps_reasoning or all(r in texts[-1] for r in CASES[reasons][-1:])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_trained_turn_ends_on_a_stop_token_at_every_position(name):
    tok, f = tokenizer_for(name), FAMILIES[name]
    stops = stop_token_ids(tok)
    assert set(tok.convert_tokens_to_ids(list(f.stops))) <= set(stops)
    cases = [(conversation(f.field, REASONS), None)]
    if f.tools:
        cases.append(([{"role": "user", "content": "Weather in Paris?"},
                       {"role": "assistant", "content": "", "tool_calls": CALL},
                       {"role": "tool", "content": "sunny, 21C"},
                       {"role": "assistant", "content": "It is sunny."}], TOOLS))
    for messages, tools in cases:
        for train_on in ("assistant", "last_assistant", "completion"):
            out = encode_chat(tok, messages, train_on=train_on, tools=tools)
            mask = [label != IGNORE_INDEX for label in out["labels"]]
            ends = [k for k in range(len(mask)) if mask[k] and (k + 1 == len(mask) or not mask[k + 1])]
            assert ends and all(out["input_ids"][k] in stops for k in ends), (train_on, tools)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_last_assistant_trains_the_final_turn_on_the_inference_history(name):
    tok, f = tokenizer_for(name), FAMILIES[name]
    if not f.keeps_reasoning:
        pytest.skip("the template drops reasoning everywhere")
    messages = conversation(f.field, REASONS[:2] + ["You are thanked"])
    out = encode_chat(tok, messages, train_on="last_assistant")
    text = tok.decode(out["input_ids"], skip_special_tokens=False)
    (trained,) = trained_texts(tok, out)
    assert "You are thanked" in trained and "You are welcome." in trained
    # The history is shown as at inference: earlier turns without their reasoning.
    assert REASONS[0] not in text and REASONS[1] not in text
    # The prompt is the model's own inference prompt: the template given the history as is where it
    # renders the final turn fully (Qwen3, GPT-OSS, Nemotron); else (the twin renders) the history
    # without reasoning, as chat applications keep it.
    own = _trl(name) not in (_trl("deepseek_r1_distill"), _trl("glm4moe"))
    history = messages[:-1] if own else [split_reasoning(m)[1] for m in messages[:-1]]
    prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt.removesuffix("<think>\n")), "the prompt is the inference prompt"


def test_without_a_twin_each_turn_is_its_own_sample_on_its_inference_history():
    # An edited Qwen3 template: no trl twin, no markers, earlier turns rewritten. One rendering cannot
    # be masked, so each trained turn becomes a sample: the conversation up to it, as at inference.
    tok = train_bpe_tokenizer(CORPUS, 400, special_tokens=IM, chat_template=_trl("qwen3") + "{#- edited #}",
                              eos_token="<|im_end|>")
    messages = conversation("reasoning_content", REASONS)
    with pytest.raises(UnstableTemplateError):
        encode_chat(tok, messages)
    samples = encode_chat_turns(tok, messages, "assistant")
    assert samples == [encode_chat(tok, messages[: i + 1], "last_assistant") for i in (2, 4, 6)]
    texts = [trained_texts(tok, s) for s in samples]
    assert texts[0] == [f"<think>\n{REASONS[0]}\n</think>\n\nFour.<|im_end|>"]
    assert texts[2] == ["<think>\n\n</think>\n\nYou are welcome.<|im_end|>"]
    assert [trained_texts(tok, s) for s in encode_chat_turns(tok, messages, "completion")] == texts[2:]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]  # probed per turn too
    # When no method applies (a header that counts messages changes every prefix): one line.
    tok.chat_template = UNSTABLE
    with pytest.raises(UnstableTemplateError, match="not prefix-stable") as err:
        encode_chat_turns(tok, messages, "assistant")
    assert "\n" not in str(err.value)


# Qwen3-Thinking-2507 style, no trl twin: the generation prompt opens <think>, history drops reasoning.
THINKING = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{% if loop.last %}<think>\n"
    "{{ m.reasoning_content }}\n</think>\n\n{% endif %}{{ m.content }}<|im_end|>\n{% else %}<|im_start|>"
    "{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_thinking_template_without_twin_trains_each_turn_after_its_real_prompt():
    tok = train_bpe_tokenizer(CORPUS, 400, special_tokens=IM, chat_template=THINKING, eos_token="<|im_end|>")
    messages = conversation("reasoning_content", REASONS[:2] + ["You are thanked"])
    texts = [trained_texts(tok, s) for s in encode_chat_turns(tok, messages, "assistant")]
    assert texts[1] == [f"{REASONS[1]}\n</think>\n\nParis, a city on the Seine.<|im_end|>"]
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    # The audit's prompt check agrees: each sample's prompt is the inference prompt by construction.
    check_generation_prompt(tok, messages)


def test_edited_template_has_no_twin_and_plain_ones_do():
    assert training_twin(_trl("qwen3"))[0] == "qwen3"
    assert training_twin(_trl("qwen3") + "{#- edited #}") is None
    assert training_twin(_trl("qwen3_training")) is None  # already a training template


# ---------------------------------------------------------------- tiny SFT runs


def save_family_model(path, name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer_for(name)
    cfg = dict(TINY_LLAMA)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        cfg.pop("model_type"), vocab_size=len(tok), pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **cfg))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["qwen3", "deepseek_r1_distill", "gptoss", "glm4moe"])
def test_tiny_sft_run_on_defaults(name, in_tmp):
    from finetune.recipe.schema import recipe_from_dict
    from finetune.run.launch import run_recipe

    f = FAMILIES[name]
    model = save_family_model(in_tmp / "model", name)
    rows = [{"messages": conversation(f.field, REASONS)} for _ in range(4)]
    write(in_tmp / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_sft_recipe(in_tmp, model, max_steps=2, micro_batch_size=2)
    recipe["tokenizer"] = {"chat_template": "auto", "max_length": 512}
    recipe["data"] = {"train": [{"path": str(in_tmp / "train.jsonl"), "format": "messages"}],
                      "eval": [{"path": str(in_tmp / "train.jsonl"), "format": "messages", "max_samples": 1}]}
    recipe["trainer"].update(exact_match_samples=1, max_new_tokens=2)
    final = run_recipe(recipe_from_dict(recipe))
    records = [json.loads(x) for x in (in_tmp / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert any("eval_exact_match" in r for r in records)
    # The run keeps the model's own template (generation renders as the authors do), not the twin.
    assert (final / "chat_template.jinja").read_text().strip() == _trl(name).strip()


def test_run_refuses_a_turn_that_does_not_learn_to_stop(capsys, in_tmp):
    model = save_tiny_chat_model(in_tmp / "model")
    recipe = tiny_sft_recipe(in_tmp, model)
    # GLM-like: a turn ends where the next role starts, and there is no twin to say so.
    recipe["tokenizer"]["chat_template"] = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")
    path = write(in_tmp / "r.yaml", json.dumps(recipe))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a stop token" in err and "data.train: sample 0" in err and len(err.splitlines()) == 1
    assert not (in_tmp / "sft").exists()


@pytest.mark.parametrize("name", ["gptoss", "glm4moe"])
def test_data_audit_passes_and_shows_the_twin_and_stop_tokens(name, capsys, in_tmp):
    f = FAMILIES[name]
    model = save_family_model(in_tmp / "model", name)
    write(in_tmp / "train.jsonl", json.dumps({"messages": conversation(f.field, REASONS)}) + "\n")
    recipe = tiny_sft_recipe(in_tmp, model)
    recipe["tokenizer"] = {"chat_template": "auto", "max_length": 512}
    recipe["data"] = {"train": [{"path": str(in_tmp / "train.jsonl"), "format": "messages"}]}
    path = write(in_tmp / "r.yaml", json.dumps(recipe))
    assert main(["data", str(path)]) == 0
    out = capsys.readouterr().err  # the audit prints on the console (stderr)
    assert f"trl's {name}_training twin" in out
    stops_line = next(line for line in out.splitlines() if "stop tokens" in line)
    assert all(s in stops_line for s in f.stops)
    assert f"{f.stops[0]}⟧" in out  # the rendered sample: the final turn's trained run ends on its stop token


def test_reasoning_reaches_a_template_that_reads_no_field_inline():
    # ChatML reads no reasoning field: a reasoning_content would vanish, so it is trained inline;
    # an empty one means "no reasoning" and adds no empty block.
    tok = train_bpe_tokenizer(CORPUS, 400, chat_template="chatml")
    messages = conversation("reasoning_content", REASONS)
    messages[-1]["reasoning_content"] = ""
    texts = trained_texts(tok, encode_chat(tok, messages))
    assert texts[0] == f"<think>\n{REASONS[0]}\n</think>\n\nFour.<|im_end|>"
    assert texts[2] == "You are welcome.<|im_end|>"
    assert encode_chat(tok, messages) == encode_chat(tok, conversation(None, REASONS))


def test_exact_match_compares_final_answers_not_reasoning(tmp_path):
    # References with a reasoning block (inline data) score on their answer, as replies do.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.rl.evaluate import exact_match, greedy_completions

    path = save_tiny_chat_model(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    prompts = [[{"role": "user", "content": "What is 1 + 2?"}], [{"role": "user", "content": "What is 3 + 4?"}]]
    replies = greedy_completions(model, tok, prompts, max_new_tokens=4)
    refs = [f"<think>\nadd them\n</think>\n\n{r}" for r in replies]
    assert exact_match(model, tok, prompts, refs, max_new_tokens=4)[0] == 1.0
    assert exact_match(model, tok, prompts, ["<think>x</think>nope"] * 2, max_new_tokens=4)[0] == 0.0
