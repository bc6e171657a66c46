"""A source's rows read lazily, in chunks, never all held in Python: what the tokenizing workers take.

``iter_chunks`` yields a source's rows a few hundred at a time: raw JSONL lines (parsed in the
worker, so an error still names ``file:line``), Arrow tables (parquet files, csv through
``datasets``, Hub datasets, ``streaming: true`` ones as an ``IterableDataset``) or ready rows (txt
documents, a .json list, which is read whole). ``rows`` turns a chunk into ``Row``s with the same
origins ``sources.read_source`` gives, so both paths name a bad row alike. Row indexes count across
a source's files, as ``read_source``'s list does: ``max_samples`` picks the same rows
(``random.Random(seed).sample`` depends only on the count), except on a stream, which takes its
first ``max_samples`` rows (a stream cannot be sampled without reading it whole).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from finetune.data.sources import (
    Row,
    _decode,
    _line_by_line,
    _open,
    _read_file,
    _read_text,
    json_row,
    source_files,
    with_format,
)
from finetune.errors import DataError
from finetune.recipe.schema import DataSource

ROWS_PER_CHUNK = 256
TXT_BLOCK = 1 << 20  # bytes of a .txt file decoded at a time
_PEEK_ROWS = 5


@dataclass
class Chunk:
    """Consecutive rows of one file (or Hub split).

    kind: "lines" ([(line number, text)] of a JSONL file), "arrow" (a pyarrow Table) or "rows" ([Row]).
    start: the source-row index of the first row; first: its index within its file (origins count
    per file); keep: offsets of the rows kept (max_samples), None for all.
    """

    kind: str
    payload: object
    where: str
    start: int
    first: int
    size: int
    keep: list[int] | None = None


def rows(chunk: Chunk) -> list[Row]:
    """The chunk's (kept) rows; DataError naming file and line for a line that is not a JSON object."""
    offsets = range(chunk.size) if chunk.keep is None else chunk.keep
    if chunk.kind == "rows":
        return [chunk.payload[k] for k in offsets]
    if chunk.kind == "arrow":
        table = chunk.payload if chunk.keep is None else chunk.payload.take(chunk.keep)
        return [Row(d, f"{chunk.where}:row {chunk.first + k}") for k, d in zip(offsets, table.to_pylist(), strict=True)]
    return [json_row(line, f"{chunk.where}:{lineno}") for lineno, line in (chunk.payload[k] for k in offsets)]


def iter_chunks(src: DataSource, key: str, per_chunk: int | None = None) -> Iterator[Chunk]:
    """Every row of the source, in order, in chunks (the first max_samples rows of a stream)."""
    per_chunk = per_chunk or ROWS_PER_CHUNK
    files = source_files(src, key)
    start = 0
    parts = _hub_parts(src, key, per_chunk) if files is None else (
        part for f in files for part in _file_parts(f, src, key, per_chunk))
    first_of: dict[str, int] = {}
    for kind, payload, where, size in parts:
        if files is None and src.streaming and src.max_samples:
            size = min(size, src.max_samples - start)
            payload = payload.slice(0, size)
        chunk = Chunk(kind, payload, where, start, first_of.get(where, 0), size)
        first_of[where] = chunk.first + size
        start += size
        yield chunk
        if files is None and src.streaming and src.max_samples and start >= src.max_samples:
            return


def selected(src: DataSource, key: str, seed: int) -> list[int] | None:
    """The source-row indexes max_samples keeps, in read_source's (sampled) order; None for all."""
    if not src.max_samples or (src.streaming and source_files(src, key) is None):
        return None
    n = sum(c.size for c in iter_chunks(src, key))
    return random.Random(seed).sample(range(n), src.max_samples) if n > src.max_samples else None


def keep_only(chunks: Iterator[Chunk], wanted: list[int] | None) -> Iterator[Chunk]:
    """The chunks restricted to the wanted source rows (kept in file order)."""
    if wanted is None:
        yield from chunks
        return
    ordered, at = sorted(wanted), 0
    for c in chunks:
        keep = []
        while at < len(ordered) and ordered[at] < c.start + c.size:
            keep.append(ordered[at] - c.start)
            at += 1
        if keep:
            yield replace(c, keep=keep)


def peek(src: DataSource, key: str) -> list[Row]:
    """The first rows of a source (format detection), reading no more than one chunk per file."""
    out: list[Row] = []
    for chunk in iter_chunks(src, key, _PEEK_ROWS):
        out += rows(chunk)[:_PEEK_ROWS - len(out)]
        if len(out) >= _PEEK_ROWS:
            break
    return out


def settle_format(src: DataSource, key: str, expected: str | None = None) -> DataSource:
    """with_format, peeking lazily (a Hub stream is not loaded to look at five rows)."""
    return src if src.format != "auto" else with_format(src, key, expected, rows=peek(src, key))


def identity(src: DataSource, key: str) -> dict:
    """What the tokenized cache of a source is keyed by: its files' paths, sizes and mtimes, or the
    Hub id with subset/split/revision (and the commit when the Hub answers)."""
    fields = {k: getattr(src, k) for k in ("path", "format", "columns", "encoding", "max_samples", "streaming")}
    files = source_files(src, key)
    if files is not None:
        stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return {**fields, "files": stats}
    commit = None
    if not os.environ.get("HF_HUB_OFFLINE"):
        try:
            from huggingface_hub import HfApi

            commit = HfApi().dataset_info(src.path, revision=src.revision, timeout=10).sha
        except Exception:  # noqa: BLE001 - offline or private: the revision as given keys it
            commit = None
    return {**fields, "split": src.split, "subset": src.subset, "revision": src.revision, "commit": commit}


def fingerprint(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------- one generator per kind of file
# Each yields (kind, payload, where, rows) parts of at most per_chunk rows.


def _file_parts(path: Path, src: DataSource, key: str, per_chunk: int):
    suffix = path.suffix
    if suffix == ".jsonl":
        yield from _jsonl_parts(path, src, key, per_chunk)
    elif suffix == ".txt":
        yield from _batched(_txt_rows(path, src, key), "rows", str(path), per_chunk)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=per_chunk)
            for batch in batches:
                yield "arrow", pa.Table.from_batches([batch]), str(path), batch.num_rows
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
    elif suffix == ".csv":
        import datasets

        try:
            ds = datasets.load_dataset("csv", data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - as sources._read_file
            raise DataError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
        for table in ds.with_format("arrow").iter(batch_size=per_chunk):
            yield "arrow", table, str(path), table.num_rows
    else:  # .json (a list, read whole) and unsupported suffixes (sources' error)
        yield from _batched(iter(_read_file(path, src, key)), "rows", str(path), per_chunk)


def _jsonl_parts(path: Path, src: DataSource, key: str, per_chunk: int):
    part: list[tuple[int, str]] = []
    with _open(path) as f:
        lines = f if _line_by_line(src.encoding) else _read_text(path, src, key).splitlines()
        for lineno, raw in enumerate(lines, 1):
            line = _decode(raw, src, key, path, lineno) if isinstance(raw, bytes) else raw
            if not line.strip():
                continue
            part.append((lineno, line))
            if len(part) == per_chunk:
                yield "lines", part, str(path), len(part)
                part = []
    if part:
        yield "lines", part, str(path), len(part)


def _txt_rows(path: Path, src: DataSource, key: str) -> Iterator[Row]:
    """sources._read_txt's documents (blank-line separated), read in blocks: split("\\n\\n") of the
    text so far, the unfinished last piece carried over (the same pieces as splitting it whole)."""
    if not _line_by_line(src.encoding):  # UTF-16/32: decoded whole, as sources does
        from finetune.data.sources import _read_txt

        yield from _read_txt(path, src, key)
        return
    decoder = codecs.getincrementaldecoder(src.encoding)()
    line, carry = 1, ""
    with _open(path) as f:
        while True:
            block = f.read(TXT_BLOCK)
            try:
                carry += decoder.decode(block, final=not block)
            except UnicodeDecodeError:
                _read_text(path, src, key)  # raises naming the line and column
                raise
            pieces = carry.split("\n\n")
            carry = pieces.pop() if block else ""
            for doc in pieces:
                doc = doc.strip("\n")
                if doc.strip():
                    yield Row({"text": doc}, f"{path}:{line}")
                line += doc.count("\n") + 2
            if not block:
                return


def _batched(items: Iterator, kind: str, where: str, per_chunk: int):
    part = []
    for item in items:
        part.append(item)
        if len(part) == per_chunk:
            yield kind, part, where, len(part)
            part = []
    if part:
        yield kind, part, where, len(part)


def _hub_parts(src: DataSource, key: str, per_chunk: int):
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split, revision=src.revision,
                                   streaming=src.streaming)
    except Exception as e:  # noqa: BLE001 - offline, missing split, auth: all are user-fixable
        raise DataError(f"{key}: cannot load Hub dataset {src.path!r} (split {src.split!r}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    where = f"{src.path}[{src.split}]"
    for table in ds.with_format("arrow").iter(batch_size=per_chunk):
        yield "arrow", table, where, table.num_rows
