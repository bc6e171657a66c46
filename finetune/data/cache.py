"""The tokenized-data cache: Arrow files, memory-mapped, keyed by everything that decides them.

An entry is a directory ``$FINETUNE_CACHE/tokenized/<kind>-<hash>/`` (default ``~/.cache/finetune``)
holding ``rows.arrow`` (Arrow IPC, one record per source row, read back memory-mapped: its rows
never enter Python until a batch asks for them) and ``meta.json`` (what it was built from). The hash
covers the source's identity (file paths, sizes, mtimes; or Hub id, split, revision, commit), its
format and columns, ``max_samples`` (and the seed that samples it), the tokenizer and chat template,
the encoding settings and the source code that encodes. An entry is written to a temporary
directory and renamed when complete, so a killed build leaves nothing half-read. Delete the
directory to clear it; ``data.cache: false`` builds into a file that is deleted once mapped.

Processes: only the main process (rank 0) builds; the other ranks wait for its word through the
process group's store (no collective timeout however long the build takes), then map the same
files. A rank that does not see the entry (no shared file system) builds its own.

Building runs ``fn(chunk, ctx)`` over a source's chunks in ``num_proc`` worker processes (forked,
the tokenizer inherited), results kept in order, at most two chunks per worker in flight, so
memory stays flat however many rows stream through.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from finetune.data.reasoning import training_twin
from finetune.data.stream import fingerprint
from finetune.errors import DataError

# The modules whose code decides what a cached entry holds: any change to them is a new key.
_CODE = ("cache.py", "formats.py", "reasoning.py", "sft_data.py", "sources.py", "stream.py", "text_data.py",
         "tokenizer.py")


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune")) / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the ids or the template would change."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(tokenizer.chat_template).encode())
    twin = training_twin(tokenizer.chat_template)  # renders the data instead: a trl upgrade may change it
    h.update(str(twin).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def default_num_proc() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def code_fingerprint() -> str:
    here = Path(__file__).parent
    return fingerprint([(name, (here / name).read_text(encoding="utf-8")) for name in _CODE])


class Rows(Sequence):
    """A sequence whose items are built on access (from the memory-mapped cache): subclasses give
    `__len__` and `_row(i)` for 0 <= i < len; this adds negative indexes and slices (as lists)."""

    def _row(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._row(j) for j in range(*i.indices(len(self)))]
        i = int(i) + (len(self) if i < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._row(i)


@dataclass
class Entry:
    table: object  # pyarrow.Table, memory-mapped
    meta: dict
    hit: bool  # loaded from the cache (not built by this call)


@dataclass
class Group:
    """This process's rank and how to hear from / speak to the others (tests replace it)."""

    rank: int = 0
    world: int = 1

    def announce(self, name: str, status: str) -> None:
        if self.world > 1:
            _store().set(f"finetune-data/{name}", status)

    def wait(self, name: str) -> str:
        if self.world == 1:
            return "ok"
        store = _store()
        store.wait([f"finetune-data/{name}"], timedelta(days=2))
        return store.get(f"finetune-data/{name}").decode()


def process_group() -> Group:
    dist = sys.modules.get("torch.distributed")  # never imports torch itself
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def build_or_load(kind: str, key: dict, build: Callable[[Path], dict], use_cache: bool = True) -> Entry:
    """The entry for `key`: built by `build(arrow_path) -> meta` on the main process, mapped everywhere."""
    if not use_cache:
        tmp = cache_dir() / "tmp" / f"{kind}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            meta = _build(tmp, build)
            entry = Entry(open_table(tmp / "rows.arrow"), meta, hit=False)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the mapping keeps the data until the process ends
        return entry
    final = cache_dir() / f"{kind}-{fingerprint(key)[:32]}"
    group = process_group()
    hit = _complete(final)
    if group.rank == 0:
        if not hit:
            try:
                _publish(final, build)
            except BaseException as e:
                group.announce(final.name, f"error: {e}")
                raise
        group.announce(final.name, "ok")
    else:
        status = group.wait(final.name)
        if status != "ok":
            raise DataError(f"the main process failed to tokenize the data: {status.removeprefix('error: ')}")
        hit = _complete(final)
        if not hit:  # the main process's cache is not on this machine
            _publish(final, build)
    return Entry(open_table(final / "rows.arrow"), json.loads((final / "meta.json").read_text()), hit)


def _complete(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / "rows.arrow").is_file()


def _publish(final: Path, build: Callable[[Path], dict]) -> None:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        _build(tmp, build)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same entry first
            if not _complete(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(directory: Path, build: Callable[[Path], dict]) -> dict:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    meta = build(directory / "rows.arrow")
    (directory / "meta.json").write_text(json.dumps(meta))
    return meta


def open_table(path: Path):
    """The Arrow file memory-mapped (zero-copy: pages are read when a row is)."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def write_batches(path: Path, batches: Iterable, schema) -> int:
    """Record batches into one Arrow IPC file; returns the rows written."""
    import pyarrow as pa

    n = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)
            n += batch.num_rows
    return n


# ---------------------------------------------------------------- parallel, in order, bounded

_WORK: tuple | None = None


def _init(fn, ctx) -> None:
    global _WORK
    _WORK = (fn, ctx)


def _call(chunk):
    fn, ctx = _WORK
    return fn(chunk, ctx)


def map_ordered(fn: Callable, ctx, chunks: Iterable, num_proc: int) -> Iterator:
    """fn(chunk, ctx) for every chunk, results in input order. With num_proc > 1 (and more than two
    chunks) in a pool of worker processes; at most 2 x num_proc chunks are read ahead."""
    it = iter(chunks)
    head = list(itertools.islice(it, 3))
    if num_proc <= 1 or len(head) < 3:
        for chunk in itertools.chain(head, it):
            yield fn(chunk, ctx)
        return
    # Forked workers inherit the tokenizer; the Rust tokenizer's own threads stay off in them.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(num_proc, _init, (fn, ctx)) as pool:
        pending: deque = deque()
        for chunk in itertools.chain(head, it):
            pending.append(pool.apply_async(_call, (chunk,)))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class Progress:
    """A line every `every` seconds while a long build runs."""

    def __init__(self, what: str, every: float = 30.0) -> None:
        self.what, self.every = what, every
        self.start = self.last = time.monotonic()

    def update(self, rows: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            from finetune.console import info

            self.last = now
            info(f"{self.what}: {rows:,} rows tokenized ({rows / (now - self.start):,.0f} rows/s)")
