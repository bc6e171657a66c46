"""Tiny random-init models of the families users fine-tune, each saved as a Hub-layout directory
beside a tokenizer that mimics its family: special tokens, bos/eos/pad habits, chat template
(trl's copy of the real one where it ships one, ChatML otherwise). Used by test_families.py.

A family's tokenizer is a byte-level BPE trained (with the `tokenizers` library) on the quickstart
data plus the family's special tokens; `pad: None` means the real tokenizer ships without a pad.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRL_TEMPLATES = None  # resolved lazily: trl's installed chat_templates/ folder

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}"
           "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
CHATML_TOKENS = ["<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_3|>", "<|eot_id|>"]
GEMMA_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 2048}


@dataclass
class Family:
    name: str
    model_type: str
    config: dict
    specials: list[str]
    bos: str | None
    eos: str
    pad: str | None
    template: str  # a trl template name, or inline jinja
    unk: str | None = None
    notes: list[str] = field(default_factory=list)


def _moe(experts_key: str, **extra) -> dict:
    return {**SMALL, experts_key: 4, "num_experts_per_tok": 2, **extra}


FAMILIES = [
    # Llama-3: no pad token, reserved tokens and <|finetune_right_pad_id|> that can pad.
    Family("llama3", "llama", SMALL, LLAMA3_TOKENS, "<|begin_of_text|>", "<|eot_id|>", None, "llama3"),
    Family("qwen2", "qwen2", SMALL, ["<|endoftext|>", *CHATML_TOKENS], None, "<|im_end|>", "<|endoftext|>",
           "qwen2_5"),
    # Qwen3's own (reasoning) template is issue 16's other half; its ChatML core is used here.
    Family("qwen3", "qwen3", {**SMALL, "head_dim": 8}, ["<|endoftext|>", *CHATML_TOKENS], None, "<|im_end|>",
           "<|endoftext|>", "qwen2_5"),
    Family("qwen3_moe", "qwen3_moe", _moe("num_experts", head_dim=8, moe_intermediate_size=32),
           ["<|endoftext|>", *CHATML_TOKENS], None, "<|im_end|>", "<|endoftext|>", "qwen2_5"),
    # Mistral v0.3: no pad, <unk> and [control_N] tokens.
    Family("mistral", "mistral", {**SMALL, "sliding_window": 16},
           ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[control_8]", "[control_9]"], "<s>", "</s>", None,
           MISTRAL, unk="<unk>"),
    Family("mixtral", "mixtral", _moe("num_local_experts"), ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
           "<s>", "</s>", None, MISTRAL, unk="<unk>"),
    Family("gemma", "gemma", {**SMALL, "head_dim": 8}, GEMMA_TOKENS, "<bos>", "<eos>", "<pad>", "gemma"),
    # Gemma 2: attention logit softcapping and alternating sliding windows.
    Family("gemma2", "gemma2", {**SMALL, "head_dim": 8, "sliding_window": 8}, GEMMA_TOKENS, "<bos>",
           "<end_of_turn>", "<pad>", "gemma"),
    Family("gemma3", "gemma3_text", {**SMALL, "head_dim": 8, "sliding_window": 8}, GEMMA_TOKENS, "<bos>",
           "<end_of_turn>", "<pad>", "gemma3"),
    # Phi-3: pad == eos, <|placeholderN|> tokens.
    Family("phi3", "phi3", {**SMALL, "pad_token_id": None},
           ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|end|>", "<|system|>",
            "<|user|>"], None, "<|endoftext|>", "<|endoftext|>", "phi3"),
    # GPT-2: learned absolute positions, one <|endoftext|> for bos/eos, no pad.
    Family("gpt2", "gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 2048},
           ["<|endoftext|>", *CHATML_TOKENS], "<|endoftext|>", "<|endoftext|>", None, CHATML),
    # GPT-NeoX: partial rotary (a quarter of each head), <|padding|> in the vocab but not set.
    Family("gpt_neox", "gpt_neox", {**SMALL, "rotary_pct": 0.25, "num_key_value_heads": 4},
           ["<|endoftext|>", "<|padding|>", *CHATML_TOKENS], "<|endoftext|>", "<|endoftext|>", None, CHATML),
    Family("olmo2", "olmo2", SMALL, ["<|endoftext|>", "<|pad|>", *CHATML_TOKENS], "<|endoftext|>",
           "<|endoftext|>", "<|pad|>", CHATML),
    Family("granite", "granite", SMALL, ["<|end_of_text|>", *CHATML_TOKENS], "<|end_of_text|>",
           "<|end_of_text|>", "<|end_of_text|>", CHATML),
    Family("cohere", "cohere", SMALL,
           ["<PAD>", "<UNK>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
            "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"],
           "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<PAD>", "cohere"),
    Family("starcoder2", "starcoder2", {**SMALL, "sliding_window": 16},
           ["<|endoftext|>", "<fim_pad>", *CHATML_TOKENS], "<|endoftext|>", "<|endoftext|>", None, CHATML),
    # gpt-oss: attention sinks, MoE, sliding windows (its harmony template is issue 16's other half).
    Family("gpt_oss", "gpt_oss", _moe("num_local_experts", head_dim=8, sliding_window=8,
                                        max_position_embeddings=131072),
           ["<|endoftext|>", *CHATML_TOKENS], None, "<|im_end|>", "<|endoftext|>", CHATML),
]
BY_NAME = {f.name: f for f in FAMILIES}


def template_text(spec: str) -> str:
    if "{" in spec:
        return spec
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{spec}.jinja").read_text(encoding="utf-8")


def corpus() -> list[str]:
    lines = []
    for name in ("sft_train.jsonl", "prompts_train.jsonl", "preference_train.jsonl"):
        lines += (ROOT / "data/quickstart" / name).read_text(encoding="utf-8").splitlines()
    return lines


def build_tokenizer(family: Family, vocab_size: int = 384):
    """A fast tokenizer with the family's special tokens and habits (trained in a few ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=family.specials, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(corpus(), trainer)
    named = {family.bos, family.eos, family.pad, family.unk}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos, pad_token=family.pad,
        unk_token=family.unk, extra_special_tokens=[t for t in family.specials if t not in named],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = template_text(family.template)
    return tok


def save_family(family: Family, path: Path, seed: int = 0) -> Path:
    """Model + tokenizer saved with save_pretrained into path (a local 'Hub' directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(family)
    config = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "pad_token_id": tok.pad_token_id, **family.config}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family.model_type, **config))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "family.json").write_text(json.dumps({"family": family.name}), encoding="utf-8")
    return path
