"""Tests for finetune.data.tokenizer: template choice, pad policy, and above all the loss masks.

Masks are checked against the `{% generation %}` twins that trl ships for real model templates
(same rendering, independent mask machinery), on tokenizers trained here in milliseconds.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trl
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune.data.stops import check_generation_prompt
from finetune.data.tokenizer import (
    IGNORE_INDEX,
    apply_chat_template_choice,
    encode_chat,
    encode_text,
    ensure_pad_token,
    resolve_chat_template,
    stop_token_ids,
    train_bpe_tokenizer,
)
from finetune.errors import DataError, TemplateError

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
CORPUS = [
    "What is two plus two? Four. And the capital of France? Paris, a city on the Seine.\n",
    "Thanks! You are welcome. The weather in Paris is sunny and 21C today.\n",
    "You are terse. A helpful assistant answers questions about cities and numbers.\n",
] * 8

MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL_TWIN = MISTRAL.replace(
    "{{ m['content'] + eos_token }}", "{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
)
# Not prefix-stable on purpose: the header counts messages, so every prefix renders a different one.
# Its blocks open with the header's newline (like Qwen's twin), and the final EOS is a block of its
# own after a newline (like Phi-3's), to exercise the marker fallback's conventions.
UNSTABLE_TWIN = (
    "{{ messages | length }} messages\n{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant' }}"
    "{% generation %}{{ '\n' + m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% elif messages[-1]['role'] == 'assistant' %}{% generation %}{{ eos_token }}{% endgeneration %}{% endif %}"
)
UNSTABLE = UNSTABLE_TWIN.replace("{% generation %}", "").replace("{% endgeneration %}", "")

IM = ("<|im_start|>", "<|im_end|>")
DEEPSEEK = tuple(
    f"<｜{t}｜>"
    for t in (
        "begin▁of▁sentence end▁of▁sentence User Assistant tool▁calls▁begin tool▁call▁begin tool▁sep "
        "tool▁call▁end tool▁calls▁end tool▁outputs▁begin tool▁output▁begin tool▁output▁end tool▁outputs▁end"
    ).split()
)


@dataclass(frozen=True)
class Style:
    """One real template style: its text, its marker twin, and what a trained turn decodes to."""

    template: str
    twin: str
    specials: tuple[str, ...]
    eos: str
    close: str  # the end-of-turn token every trained assistant turn must contain
    expect: Callable[[str, bool], str]  # (content, is_final_turn) -> decoded trained text
    bos: str = "<|endoftext|>"
    system: bool = True
    tools: bool = False


def _trl(name: str) -> str:
    return (TRL_TEMPLATES / f"{name}.jinja").read_text()


STYLES = {
    "qwen2_5": Style(
        _trl("qwen2_5"),
        _trl("qwen2_5_training"),
        IM,
        "<|im_end|>",
        "<|im_end|>",
        lambda c, last: c + "<|im_end|>",
        tools=True,
    ),
    "qwen3_instruct_2507": Style(
        _trl("qwen3_instruct_2507"),
        _trl("qwen3_instruct_2507_training"),
        IM,
        "<|im_end|>",
        "<|im_end|>",
        lambda c, last: c + "<|im_end|>",
        tools=True,
    ),
    # Plain Qwen3 is not prefix-stable (see test below); its training twin is, with markers.
    "qwen3": Style(
        _trl("qwen3_training"),
        _trl("qwen3_training"),
        IM,
        "<|im_end|>",
        "<|im_end|>",
        lambda c, last: "<think>\n\n</think>\n\n" + c + "<|im_end|>",
        tools=True,
    ),
    "llama3": Style(
        _trl("llama3"),
        _trl("llama3_training"),
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|eot_id|>",
        lambda c, last: c.strip() + "<|eot_id|>",
        bos="<|begin_of_text|>",
    ),
    "gemma": Style(
        _trl("gemma"),
        _trl("gemma_training"),
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        "<eos>",
        "<end_of_turn>",
        lambda c, last: c.strip() + "<end_of_turn>",
        bos="<bos>",
        system=False,
    ),
    "gemma3": Style(
        _trl("gemma3"),
        _trl("gemma3_training"),
        ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
        "<eos>",
        "<end_of_turn>",
        lambda c, last: c.strip() + "<end_of_turn>",
        bos="<bos>",
    ),
    # Phi-3 appends EOS after the final message: trained there, with the newline before it.
    "phi3": Style(
        _trl("phi3"),
        _trl("phi3_training"),
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|endoftext|>",
        "<|end|>",
        lambda c, last: c + "<|end|>" + ("\n<|endoftext|>" if last else ""),
    ),
    "mistral": Style(
        MISTRAL,
        MISTRAL_TWIN,
        ("<s>", "</s>", "[INST]", "[/INST]"),
        "</s>",
        "</s>",
        lambda c, last: c + "</s>",
        bos="<s>",
        system=False,
    ),
    # DeepSeek-V3's generation prompt adds "<think>\n": not prefix-stable, so the marker fallback
    # runs, and its twin puts the "<｜Assistant｜>" header inside the block.
    "deepseekv3": Style(
        _trl("deepseekv3_training"),
        _trl("deepseekv3_training"),
        DEEPSEEK,
        "<｜end▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        lambda c, last: "<｜Assistant｜>" + c + "<｜end▁of▁sentence｜>",
        bos="<｜begin▁of▁sentence｜>",
        tools=True,
    ),
}

CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": CITY}}]
CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]


def chat(system: bool = True) -> list[dict]:
    head = [{"role": "system", "content": "You are terse."}] if system else []
    turns = [
        ("What is two plus two?", "Four."),
        ("And the capital of France?", "Paris, a city on the Seine."),
        ("Thanks!", "You are welcome."),
    ]
    return head + [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]


def tool_chat() -> list[dict]:
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": CALL},
        {"role": "tool", "content": "sunny, 21C"},
        {"role": "assistant", "content": "It is sunny and 21C in Paris."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You are welcome."},
    ]


def fresh_tokenizer(name: str, template: str):
    style = STYLES[name]
    return train_bpe_tokenizer(
        CORPUS, 400, special_tokens=style.specials, chat_template=template, bos_token=style.bos, eos_token=style.eos
    )


@functools.cache
def tokenizer_for(name: str):
    return fresh_tokenizer(name, STYLES[name].template)


@functools.cache
def chatml_tokenizer():
    return train_bpe_tokenizer(CORPUS, 400, chat_template="chatml")


def cases(name: str) -> list[tuple[list[dict], list | None]]:
    style = STYLES[name]
    return [(chat(style.system), None)] + ([(tool_chat(), TOOLS)] if style.tools else [])


def trained(out: dict) -> list[int]:
    return [int(label != IGNORE_INDEX) for label in out["labels"]]


def trained_texts(tok, out: dict) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip([*out["input_ids"], None], [*out["labels"], IGNORE_INDEX], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            current = []
    return runs


def trim_marker_mask(tok, ids: list[int], mask: list[int]) -> list[int]:
    """Apply our documented whitespace convention to a marker mask: in each block drop leading
    whitespace tokens, and whitespace tokens that follow a closing special token."""
    mask, special = list(mask), set(tok.all_special_ids)
    is_ws = [not tok.decode([i]).strip() and i not in special for i in ids]
    k = 0
    while k < len(mask):
        if not mask[k]:
            k += 1
            continue
        end = k
        while end < len(mask) and mask[end]:
            end += 1
        start = k
        while start < end and is_ws[start]:
            mask[start], start = 0, start + 1
        last = end
        while last > start and is_ws[last - 1]:
            last -= 1
        if last > start and ids[last - 1] in special:
            mask[last:end] = [0] * (end - last)
        k = end
    return mask


# ---------------------------------------------------------------- masks on real template styles


@pytest.mark.parametrize("name", sorted(STYLES))
def test_masks_equal_generation_marker_masks(name):
    tok, style = tokenizer_for(name), STYLES[name]
    for messages, tools in cases(name):
        out = encode_chat(tok, messages, tools=tools)
        ref = tok.apply_chat_template(
            messages, tools=tools, chat_template=style.twin, return_dict=True, return_assistant_tokens_mask=True
        )
        assert list(ref["input_ids"]) == out["input_ids"], "the twin must render the same text"
        ours, theirs = trained(out), list(ref["assistant_masks"])
        assert ours == trim_marker_mask(tok, out["input_ids"], theirs)
        # The convention difference is only whitespace at block edges, and only ever removed.
        diff = [tok.decode([i]) for i, a, b in zip(out["input_ids"], ours, theirs, strict=True) if a != b]
        assert all(not d.strip() for d in diff) and all(a <= b for a, b in zip(ours, theirs, strict=True))
        assert sum(ours) > 0


@pytest.mark.parametrize("name", sorted(STYLES))
def test_trained_text_is_assistant_content_plus_end_of_turn(name):
    tok, style = tokenizer_for(name), STYLES[name]
    messages = chat(style.system)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = [style.expect(c, k == len(replies) - 1) for k, c in enumerate(replies)]
    assert trained_texts(tok, encode_chat(tok, messages)) == expected


@pytest.mark.parametrize("name", sorted(STYLES))
def test_end_of_turn_trained_for_every_assistant_turn_only(name):
    tok, style = tokenizer_for(name), STYLES[name]
    close = tok.convert_tokens_to_ids(style.close)
    for messages, tools in cases(name):
        out = encode_chat(tok, messages, tools=tools)
        trained_closes = [label for label in out["labels"] if label == close]
        assert len(trained_closes) == sum(m["role"] == "assistant" for m in messages)
        if name not in ("mistral", "deepseekv3"):  # these close only assistant turns with the token
            assert out["input_ids"].count(close) > len(trained_closes)


@pytest.mark.parametrize("name", sorted(STYLES))
def test_marker_fallback_agrees_with_prefix_masks(name):
    # A header that counts messages makes any twin unstable, forcing the {% generation %} fallback.
    tok = tokenizer_for(name)
    unstable = fresh_tokenizer(name, "{{ messages | length }} messages\n" + STYLES[name].twin)
    for messages, tools in cases(name):
        for train_on in ("assistant", "last_assistant"):
            expected = trained_texts(tok, encode_chat(tok, messages, train_on, tools=tools))
            assert trained_texts(unstable, encode_chat(unstable, messages, train_on, tools=tools)) == expected


def test_tool_calls_trained_and_tool_results_not():
    tok = chatml_tokenizer()
    texts = trained_texts(tok, encode_chat(tok, tool_chat(), tools=TOOLS))
    assert texts[0] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert not any("sunny, 21C" in t for t in texts)
    # content=None is fine on a tool-call turn
    messages = tool_chat()
    messages[2] = {"role": "assistant", "content": None, "tool_calls": CALL}
    assert trained_texts(tok, encode_chat(tok, messages, tools=TOOLS))[0] == texts[0]


def test_edited_qwen3_without_twin_is_not_prefix_stable():
    # Qwen3 renders an empty <think> block only in the final turn, so earlier turns change. An edited
    # copy is no longer trl's original, so no training twin rescues it (tests/test_reasoning.py).
    edited = _trl("qwen3") + "{#- a local edit #}"
    tok = train_bpe_tokenizer(CORPUS, 400, special_tokens=IM, chat_template=edited, eos_token="<|im_end|>")
    with pytest.raises(TemplateError, match="not prefix-stable.*message 2.*or train_on: last_assistant"):
        encode_chat(tok, chat())
    # A single turn is stable, and then the empty think block is what the model must produce.
    out = encode_chat(tok, chat()[:3])
    assert trained_texts(tok, out) == ["<think>\n\n</think>\n\nFour.<|im_end|>"]
    last = encode_chat(tok, chat(), train_on="last_assistant")
    assert trained_texts(tok, last) == ["<think>\n\n</think>\n\nYou are welcome.<|im_end|>"]


def test_generation_prompt_mismatch_without_markers_raises():
    tok = tokenizer_for("deepseekv3")
    edited = _trl("deepseekv3") + "{#- a local edit: no trl twin #}"
    tok_plain = train_bpe_tokenizer(
        CORPUS, 400, special_tokens=DEEPSEEK, chat_template=edited, bos_token=DEEPSEEK[0], eos_token=DEEPSEEK[1]
    )
    with pytest.raises(TemplateError, match="generation prompt before message 2"):
        encode_chat(tok_plain, chat())
    for t in (tok, tok_plain):
        with pytest.raises(TemplateError, match="generation prompt"):
            check_generation_prompt(t, chat()[:2])
    check_generation_prompt(tokenizer_for("llama3"), chat())
    check_generation_prompt(tokenizer_for("phi3"), chat()[:2])  # prompt-only: probe reply


def test_unstable_template_raises_and_markers_rescue_it():
    tok = train_bpe_tokenizer(CORPUS, 400, chat_template=UNSTABLE)
    with pytest.raises(TemplateError, match="not prefix-stable") as err:
        encode_chat(tok, chat(), index=4)
    assert str(err.value).startswith("sample 4: ") and "\n" not in str(err.value)
    tok.chat_template = UNSTABLE_TWIN
    out = encode_chat(tok, chat())
    assert trained_texts(tok, out) == [
        "Four.<|im_end|>",
        "Paris, a city on the Seine.<|im_end|>",
        "You are welcome.<|im_end|>\n<|endoftext|>",
    ]
    last = encode_chat(tok, chat(), train_on="last_assistant")
    assert trained_texts(tok, last) == ["You are welcome.<|im_end|>\n<|endoftext|>"]


def test_token_straddling_the_prompt_boundary_is_trained():
    # "Bot: " + "Four." tokenizes as "Bot", ":", " Four", "." -- " Four" starts in the prompt.
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
        "{% else %}{{ 'Bot: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Bot: ' }}{% endif %}"
    )
    tok = train_bpe_tokenizer(CORPUS, 400, chat_template=template)
    assert tok.convert_ids_to_tokens(tok("Bot: Four.")["input_ids"])[-2:] == ["ĠFour", "."]
    out = encode_chat(tok, chat(system=False))
    assert trained_texts(tok, out) == [
        " Four.<|endoftext|>",
        " Paris, a city on the Seine.<|endoftext|>",
        " You are welcome.<|endoftext|>",
    ]


# ---------------------------------------------------------------- train_on, overflow, validation


def test_train_on_semantics():
    tok = chatml_tokenizer()
    messages = tool_chat()[:5]  # system, user, tool call, tool, answer
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    answer = "It is sunny and 21C in Paris.<|im_end|>"
    assert trained_texts(tok, encode_chat(tok, messages, "assistant")) == [call, answer]
    assert trained_texts(tok, encode_chat(tok, messages, "last_assistant")) == [answer]
    assert trained_texts(tok, encode_chat(tok, messages, "completion")) == [call, answer]
    assert trained_texts(tok, encode_chat(tok, chat(), "completion")) == ["You are welcome.<|im_end|>"]
    every = encode_chat(tok, messages, "all")
    assert every["labels"] == every["input_ids"]
    pair = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]
    assert encode_chat(tok, pair, "completion") == encode_chat(tok, pair, "last_assistant")


def test_leading_assistant_message_is_context():
    tok = chatml_tokenizer()
    messages = [{"role": "assistant", "content": "Hi!"}, *chat(system=False)[:2]]
    assert trained_texts(tok, encode_chat(tok, messages)) == ["Four.<|im_end|>"]


def test_truncate_and_drop():
    tok = chatml_tokenizer()
    full = encode_chat(tok, chat())
    n = len(full["input_ids"])
    cut = encode_chat(tok, chat(), max_length=n - 5)
    assert cut["truncated"] and len(cut["input_ids"]) == n - 5
    assert cut["input_ids"] == full["input_ids"][: n - 5] and cut["labels"] == full["labels"][: n - 5]
    assert encode_chat(tok, chat(), max_length=n - 5, overflow="drop") is None
    assert encode_chat(tok, chat(), max_length=n, overflow="drop") == {**full, "truncated": False}
    assert not full["truncated"]


@pytest.mark.parametrize(
    ("messages", "train_on", "match"),
    [
        ([], "assistant", "empty conversation"),
        ([{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}], "assistant", "unknown role 'bot'"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], "assistant", "message 0: user message has no"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}], "assistant", "empty content"),
        ([{"role": "user", "content": "x"}], "assistant", "no assistant message"),
        ([{"role": "user", "content": "x"}], "last_assistant", "no assistant message"),
        (chat()[:3] + [{"role": "user", "content": "x"}], "completion", "after the last user message"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "tool_calls": {}}], "all", "a list"),
    ],
)
def test_bad_messages_raise_data_error_with_index(messages, train_on, match):
    with pytest.raises(DataError, match=match) as err:
        encode_chat(chatml_tokenizer(), messages, train_on=train_on, index=7)
    assert str(err.value).startswith("sample 7: ") and "\n" not in str(err.value)


def test_template_that_raises_becomes_template_error():
    tok = tokenizer_for("gemma")  # gemma refuses system messages
    with pytest.raises(TemplateError, match="sample 2: chat template failed to render: System role"):
        encode_chat(tok, chat(system=True), index=2)


# ---------------------------------------------------------------- property test


TEXT = st.text(alphabet=st.sampled_from(list("abcxyz ABC.,!?\n\t019éß日本🙂-'\"")), min_size=1, max_size=30)
CONTENT = TEXT.filter(lambda s: s.strip())


@settings(max_examples=50, deadline=None, database=None)  # database=None: no .hypothesis/ dir
@given(system=st.one_of(st.none(), CONTENT), turns=st.lists(st.tuples(CONTENT, CONTENT), min_size=1, max_size=4))
def test_property_trained_tokens_decode_to_assistant_spans(system, turns):
    tok = chatml_tokenizer()
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]
    out = encode_chat(tok, messages)
    assert trained_texts(tok, out) == [a + "<|im_end|>" for _, a in turns]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(out["input_ids"], clean_up_tokenization_spaces=False) == rendered


# ---------------------------------------------------------------- tokenizer, templates, pad


def test_bpe_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = chatml_tokenizer()
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|endoftext|>", "<|pad|>")
    assert tok.pad_token_id != tok.eos_token_id
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    text = "Paris<|im_end|> is sunny 🙂 日本\n"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == text
    assert back.chat_template == tok.chat_template
    assert (back.eos_token, back.pad_token, back.pad_token_id) == (tok.eos_token, tok.pad_token, tok.pad_token_id)
    assert encode_chat(back, chat()) == encode_chat(tok, chat())


def test_encode_text_appends_eos_once():
    tok = chatml_tokenizer()
    ids = encode_text(tok, "The weather in Paris.")
    assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == "The weather in Paris."
    assert encode_text(tok, "The weather in Paris.", add_eos=False) == ids[:-1]
    assert encode_text(tok, "Paris<|endoftext|>").count(tok.eos_token_id) == 1


def test_resolve_chat_template(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 300)
    with pytest.raises(TemplateError, match="no chat template.*chatml"):
        resolve_chat_template(tok, "auto")
    chatml = resolve_chat_template(tok, "chatml")
    assert "<|im_start|>" in chatml
    (tmp_path / "mine.jinja").write_text("{{ messages[0]['content'] }}")
    assert resolve_chat_template(tok, "mine.jinja", base_dir=tmp_path) == "{{ messages[0]['content'] }}"
    assert resolve_chat_template(tok, "{{ 'x' }}") == "{{ 'x' }}"
    with pytest.raises(TemplateError, match="did you mean 'chatml'"):
        resolve_chat_template(tok, "chatm")
    with pytest.raises(TemplateError, match="not found"):
        resolve_chat_template(tok, "missing.jinja", base_dir=tmp_path)
    with pytest.raises(TemplateError, match="syntax error line 1"):
        resolve_chat_template(tok, "{% for m in messages %}")
    tok.chat_template = chatml
    assert resolve_chat_template(tok, "auto") == chatml


def test_apply_chat_template_choice_adds_missing_tokens():
    tok = train_bpe_tokenizer(CORPUS, 300, special_tokens=["<|endoftext|>"])
    size = len(tok)
    assert apply_chat_template_choice(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert len(tok) == size + 2 and tok.tokenize("<|im_end|>") == ["<|im_end|>"]
    assert apply_chat_template_choice(tok, "chatml") == []
    assert trained_texts(tok, encode_chat(tok, chat()))[0] == "Four.<|im_end|>"


def test_ensure_pad_token_keeps_the_vocabulary_unless_a_distinct_pad_is_needed():
    tok = train_bpe_tokenizer(CORPUS, 300, special_tokens=["<|endoftext|>"], pad_token="<|endoftext|>")
    assert "same as eos" in ensure_pad_token(tok)
    size = len(tok)
    tok.pad_token = None  # GPT-2's habit: one <|endoftext|>, nothing reserved
    assert "set to eos" in ensure_pad_token(tok) and len(tok) == size
    # PPO's case: pad must not be a stop token; nothing free is left, so one token is added.
    assert "added pad token '<|pad|>'" in ensure_pad_token(tok, {tok.eos_token_id})
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id and len(tok) == size + 1
    assert "already set" in ensure_pad_token(tok, {tok.eos_token_id})


def test_stop_token_ids():
    tok = chatml_tokenizer()
    assert stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    phi = tokenizer_for("phi3")
    assert phi.convert_tokens_to_ids("<|end|>") in stop_token_ids(phi)
