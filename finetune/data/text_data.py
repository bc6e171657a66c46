"""Pretraining text at scale: documents tokenized in parallel into the Arrow cache, blocks cut on access.

Each text source is read in chunks and every document encoded (``tokenizer.encode_text``: its ids,
then EOS) by ``num_proc`` worker processes into a memory-mapped Arrow file, one record per source
row (empty for a blank document), cached like SFT's (``finetune.data.cache``): a second start maps
the file and calls no tokenizer. The documents in ``read_texts``' order (its max_samples sample,
blank ones left out), split by document for ``eval_fraction``, form one token stream; ``Blocks`` cuts
it into ``max_length`` blocks, the tail dropped, as ``trainers.pretrain.make_blocks`` does, reading
only the documents a block covers.
"""

from __future__ import annotations

import numpy as np

from finetune.data import cache
from finetune.data.cache import Rows
from finetune.data.sft_data import Mixed, Ragged
from finetune.data.sources import column
from finetune.data.stream import identity, iter_chunks, keep_only, rows, selected, settle_format
from finetune.data.tokenizer import encode_text
from finetune.errors import DataError
from finetune.recipe.schema import DataSource


def _schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32()))])


def encode_chunk(chunk, ctx):
    """The chunk's documents' ids (+ EOS); [] for a blank one (a worker's job)."""
    import pyarrow as pa

    tokenizer, src = ctx
    out = []
    for row in rows(chunk):
        text = column(row, src, "text")
        if not isinstance(text, str):
            raise DataError(f"{row.origin}: column 'text' must be a string, got {type(text).__name__}")
        out.append(encode_text(tokenizer, text, add_eos=True) if text.strip() else [])
    return pa.RecordBatch.from_pydict({"input_ids": out}, schema=_schema())


class DocTable:
    """One tokenized text source, memory-mapped: document r's ids as a numpy view."""

    def __init__(self, entry: cache.Entry) -> None:
        self.entry = entry
        self.docs = Ragged(entry.table.column("input_ids").chunks)
        self.lengths = self.docs.lengths

    def __getitem__(self, r: int) -> np.ndarray:
        return self.docs[r]

    def read_order(self) -> np.ndarray:
        """Rows in read_source's order, blank documents left out (read_texts skips them)."""
        wanted = self.entry.meta.get("selected")
        order = np.arange(len(self.lengths))
        if wanted is not None:
            wanted = np.asarray(wanted, dtype=np.int64)
            order = np.searchsorted(np.sort(wanted), wanted)
        return order[self.lengths[order] > 0]


def load_texts(sources: list[DataSource], key: str, tokenizer, seed: int, num_proc: int,
               use_cache: bool = True) -> Mixed:
    """read_texts' documents, tokenized (or mapped from the cache), as references in order."""
    from finetune import __version__

    tables, src_ids, rows_ = [], [], []
    for i, src in enumerate(sources):
        where = f"{key}.{i}.path"
        src = settle_format(src, where, expected="text")
        if src.format != "text":
            raise DataError(f"{key}.{i}.format: this trainer reads format 'text', got {src.format!r}")
        fields = {"source": identity(src, where), "seed": seed if src.max_samples else None,
                  "tokenizer": cache.tokenizer_fingerprint(tokenizer),
                  "version": __version__, "code": cache.code_fingerprint()}

        def build(path, src=src, where=where) -> dict:
            progress, n = cache.Progress(where), 0
            wanted = selected(src, where, seed)  # max_samples' rows (kept in meta.json)

            def counted(batches):
                nonlocal n
                for batch in batches:
                    n += batch.num_rows
                    progress.update(n)
                    yield batch

            chunks = keep_only(iter_chunks(src, where), wanted)
            batches = cache.map_ordered(encode_chunk, (tokenizer, src), chunks, num_proc)
            if cache.write_batches(path, counted(batches), _schema()) == 0:
                raise DataError(f"{where}: {src.path} holds no rows")
            return {"rows": n, "selected": wanted, "source": src.path, "num_proc": num_proc}

        table = DocTable(cache.build_or_load("text", fields, build, use_cache))
        order = table.read_order()
        tables.append(table)
        rows_.append(order)
        src_ids.append(np.full(len(order), i, dtype=np.int64))
    docs = Mixed(tables, np.concatenate(src_ids), np.concatenate(rows_))
    if not len(docs):
        raise DataError(f"{key}: the data sources hold no non-empty text")
    return docs


class Blocks(Rows):
    """The documents' token stream cut into `length`-token blocks ({"input_ids", "labels"}), the last
    partial block dropped (a stream shorter than one block is one short block), as make_blocks."""

    def __init__(self, docs: Mixed, length: int) -> None:
        self.docs = docs
        self.cum = np.concatenate([[0], np.cumsum(docs.per_table([t.lengths for t in docs.tables]))])
        total = int(self.cum[-1])
        if total < 2:
            raise DataError("data: the text holds fewer than two tokens")
        self.size = length if total >= length else total
        self.n = total // self.size
        self.dropped = total - self.n * self.size

    def __len__(self) -> int:
        return self.n

    def _row(self, i: int):
        start, end = i * self.size, (i + 1) * self.size
        d = int(np.searchsorted(self.cum, start, side="right")) - 1
        pieces, pos = [], start
        while pos < end:
            doc = self.docs.tables[self.docs.src[d]][int(self.docs.rows[d])]
            lo, hi = pos - self.cum[d], min(end, self.cum[d + 1]) - self.cum[d]
            pieces.append(doc[lo:hi])
            pos, d = self.cum[d] + hi, d + 1
        ids = np.concatenate(pieces).tolist()
        return {"input_ids": ids, "labels": list(ids)}
