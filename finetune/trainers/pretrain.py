"""Causal-LM pretraining (`trainer.type: pretrain`), from scratch or continued.

Algorithm: documents are tokenized, each followed by EOS, concatenated into one stream and cut
into blocks of `tokenizer.max_length` tokens; every token is trained with teacher forcing
(next-token cross-entropy, token mean over the optimizer step). As in GPT-2/LLaMA pretraining,
attention may cross document boundaries inside a block (EOS marks them); the final partial
block is dropped. From scratch, `model.init_config` builds a randomly initialised model of any
transformers causal-LM architecture and `tokenizer.train` fits a byte-level BPE tokenizer on the
training text (the chat-template tokens are added so later SFT stages can use ChatML). Documents
are tokenized in parallel into the Arrow cache (`finetune.data.text_data`): a restart tokenizes
nothing.

    finetune run recipes/pretrain.yaml
    finetune run recipes/pretrain_tiny.yaml run.max_steps=50
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from finetune.console import info
from finetune.data.cache import default_num_proc
from finetune.data.sft_data import holdout
from finetune.data.sources import read_texts, split_holdout
from finetune.data.text_data import Blocks, load_texts
from finetune.data.tokenizer import encode_text
from finetune.data.tokenizer_setup import load_tokenizer
from finetune.errors import DataError
from finetune.recipe.schema import Recipe
from finetune.train import engine
from finetune.train.collate import collate_padded
from finetune.train.plan import Plan


@dataclass
class Prepared:
    tokenizer: object
    train_blocks: Sequence[dict]  # read from the tokenized cache on access (finetune.data.text_data)
    eval_blocks: Sequence[dict]
    train_tokens: int
    dropped_tokens: int


def prepare(recipe: Recipe, resume_from: Path | None = None) -> Prepared:
    """Reads and tokenizes the data (and trains the tokenizer when asked): no model weights.

    Documents are tokenized by data.num_proc processes into the Arrow cache, so a second start
    tokenizes nothing; the blocks equal make_blocks' on the same documents."""
    seed, data = recipe.run.seed, recipe.data
    texts = None
    if recipe.tokenizer.train is not None and not (resume_from and (resume_from / "tokenizer").is_dir()):
        docs = read_texts(data.train, "data.train", seed)  # the tokenizer trains on the training text
        if data.eval_fraction and not data.eval:
            docs = split_holdout(docs, data.eval_fraction, seed)[0] if len(docs) >= 2 else docs
        texts = [t for t, _ in docs]
    tokenizer = load_tokenizer(recipe, texts=texts, resume_from=resume_from)
    load = partial(load_texts, tokenizer=tokenizer, seed=seed, num_proc=data.num_proc or default_num_proc(),
                   use_cache=data.cache)
    train = load(data.train, "data.train")
    if data.eval:
        evals = load(data.eval, "data.eval")
    elif data.eval_fraction:
        if len(train) < 2:
            raise DataError("data.eval_fraction: needs at least two documents to hold one out")
        # Split by document before blocking, so no held-out text leaks into training blocks.
        train, evals = holdout(train, data.eval_fraction, seed)
    else:
        evals = None
    length = recipe.tokenizer.max_length
    train_blocks = Blocks(train, length)
    eval_blocks = Blocks(evals, length) if evals is not None else []
    return Prepared(tokenizer, train_blocks, eval_blocks, len(train_blocks) * length, train_blocks.dropped)


def make_blocks(tokenizer, texts: list[str], length: int) -> tuple[list[dict], int]:
    """Documents + EOS, concatenated and cut into `length`-token blocks; returns (blocks, dropped)."""
    stream: list[int] = []
    for text in texts:
        stream.extend(encode_text(tokenizer, text, add_eos=True))
    if len(stream) < 2:
        raise DataError("data: the text holds fewer than two tokens")
    if len(stream) < length:  # a tiny corpus still yields one (short) block
        return [{"input_ids": stream, "labels": list(stream)}], 0
    n = len(stream) // length
    blocks = [stream[i * length:(i + 1) * length] for i in range(n)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks], len(stream) - n * length


def plan(recipe: Recipe, prepared: Prepared | None = None, info_=None) -> Plan:
    from finetune.models.loading import count_params_meta

    prepared = prepared or prepare(recipe)
    if info_ is None:
        total, trainable = count_params_meta(recipe, prepared.tokenizer)
        source = recipe.model.name or "from scratch (model.init_config)"
        notes = []
    else:
        total, trainable, source, notes = info_.total_params, info_.trainable_params, info_.source, info_.notes
    notes = notes + [f"{prepared.dropped_tokens:,} tail tokens dropped (last partial block)"] \
        if prepared.dropped_tokens else notes
    return Plan("pretrain", source, total, trainable, len(prepared.train_blocks), prepared.train_tokens,
                len(prepared.eval_blocks), unit="blocks", notes=notes)


def train(recipe: Recipe, resume_from: Path | None = None, num_processes: int = 1) -> Path:
    from finetune.models.loading import load_model

    engine.start_process()  # this rank's device before any weight (QLoRA loads onto it)
    prepared = prepare(recipe, resume_from)
    model, model_info = load_model(recipe, prepared.tokenizer)
    for line in plan(recipe, prepared, model_info).lines(recipe, num_processes):
        info(line)
    task = engine.SupervisedTask(
        model=model, tokenizer=prepared.tokenizer, train_units=prepared.train_blocks,
        eval_units=prepared.eval_blocks,
        collate=partial(collate_padded, pad_id=prepared.tokenizer.pad_token_id),
    )
    return engine.train(recipe, task, resume_from=resume_from)
