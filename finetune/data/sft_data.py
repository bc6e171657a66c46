"""SFT data at scale: sources tokenized in parallel into the Arrow cache, samples read from it lazily.

Each source is read in chunks (``finetune.data.stream``), every row converted (``formats``) and
encoded (``tokenizer.encode_chat_turns``) by ``num_proc`` worker processes, and written, one record
per source row, to a memory-mapped Arrow file (``finetune.data.cache``): the conversation (JSON),
its kept samples' input_ids and labels, the counts ``EncodeStats`` sums, the first token of a
trained turn that does not end on a stop token, and the row's error, if any.

Everything after that works on row indexes, never on rows: the source's ``max_samples`` sample,
the mixing weights and the held-out split replay ``sources.mix_sources`` and ``split_holdout``
exactly (their random draws depend only on counts), bad rows are reported (``data.on_bad_row``) in
the order ``encode_conversations`` reports them, and the samples come out in the same order, so
the result equals ``encode_conversations(mix_sources(...))`` sample for sample (tested).
"""

from __future__ import annotations

import json
import random
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from finetune.data import cache
from finetune.data.cache import Rows
from finetune.data.formats import Conversation, to_conversation
from finetune.data.sources import BadRows, EncodeStats
from finetune.data.stream import identity, iter_chunks, keep_only, rows, selected, settle_format
from finetune.data.tokenizer import encode_chat_turns, stop_token_ids
from finetune.errors import DataError, TemplateError
from finetune.recipe.schema import DataSource

_COUNTS = ("dropped", "truncated", "no_trained", "tokens", "trained")


def _schema():
    import pyarrow as pa

    ids = pa.list_(pa.list_(pa.int32()))
    return pa.schema([("conversation", pa.string()), ("input_ids", ids), ("labels", ids),
                      ("stop_bad", pa.list_(pa.int32())), *[(c, pa.int32()) for c in _COUNTS],
                      ("error", pa.string()), ("error_kind", pa.string()), ("error_stage", pa.string())])


@dataclass(frozen=True)
class Settings:
    train_on: str
    max_length: int
    overflow: str
    stops: frozenset[int] | None  # None: the stop check is left to check_learns_to_stop


def encode_chunk(chunk, ctx) -> object:
    """One record per row of the chunk (a worker's job): what encode_conversations does to it."""
    import pyarrow as pa

    tokenizer, src, s = ctx
    cols: dict[str, list] = {name: [] for name in _schema().names}
    for row in rows(chunk):
        out = {"conversation": None, "input_ids": [], "labels": [], "stop_bad": [], "error": None,
               "error_kind": None, "error_stage": None} | dict.fromkeys(_COUNTS, 0)
        try:
            conv = to_conversation(row, src)
            out["conversation"] = json.dumps([conv.messages, conv.tools], default=str)
            try:
                encs = encode_chat_turns(tokenizer, conv.messages, s.train_on, s.max_length, s.overflow, conv.tools)
            except (DataError, TemplateError) as e:
                out |= {"error": f"{conv.origin}: {e}", "error_stage": "encode",
                        "error_kind": "data" if isinstance(e, DataError) else "template"}
                encs = []
        except DataError as e:
            out |= {"error": str(e), "error_stage": "convert", "error_kind": "data"}
            encs = []
        for enc in encs:
            _add_sample(out, enc, s)
        for name, value in out.items():
            cols[name].append(value)
    return pa.RecordBatch.from_pydict(cols, schema=_schema())


def _add_sample(out: dict, enc: dict | None, s: Settings) -> None:
    if enc is None:
        out["dropped"] += 1
        return
    out["truncated"] += bool(enc.get("truncated"))
    ids, labels = enc["input_ids"], enc["labels"]
    mask = np.asarray(labels) != -100
    mask[:1] = False  # the first token is never a target (stops.labels_mask)
    trained = int(mask.sum())
    if trained == 0:
        out["no_trained"] += 1
        return
    out["tokens"] += len(ids)
    out["trained"] += trained
    out["input_ids"].append(ids)
    out["labels"].append(labels)
    out["stop_bad"].append(-1 if s.stops is None else _stop_problem(np.asarray(ids), mask, s))


def _stop_problem(ids: np.ndarray, mask: np.ndarray, s: Settings) -> int:
    """stops.stop_problems + check_learns_to_stop's rule (a truncated sample may end mid-answer):
    the first token that ends a trained run and is no stop token, or -1."""
    ends = np.flatnonzero(mask & ~np.append(mask[1:], False)).tolist()
    bad = [i for i in ends if int(ids[i]) not in s.stops]
    if not bad or (bad == [len(ids) - 1] and len(ids) >= s.max_length):
        return -1
    return bad[0]


class Ragged:
    """The chunks of a memory-mapped Arrow list<int> array as flat items: item s as a numpy view,
    copied only when asked (a list<list<int>> column is flattened to its samples first)."""

    def __init__(self, chunks) -> None:
        self.starts, self.parts = [0], []
        for c in chunks:
            self.parts.append((c.offsets.to_numpy(), c.values.to_numpy()))
            self.starts.append(self.starts[-1] + len(c))
        self.lengths = np.concatenate([np.diff(off) for off, _ in self.parts] or [np.zeros(0, np.int64)])

    @classmethod
    def nested(cls, column) -> Ragged:
        return cls([c.flatten() for c in column.chunks])

    def __getitem__(self, s: int) -> np.ndarray:
        c = bisect_right(self.starts, s) - 1
        offsets, values = self.parts[c]
        j = s - self.starts[c]
        return values[offsets[j]:offsets[j + 1]]


class Table:
    """One tokenized source: its memory-mapped entry and the per-row arrays the mixing needs."""

    def __init__(self, entry: cache.Entry, src: DataSource) -> None:
        import pyarrow.compute as pc

        t = entry.table
        self.entry, self.src = entry, src
        self.kept = pc.list_value_length(t.column("input_ids")).to_numpy().astype(np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.kept)])  # each row's first sample
        self.counts = {c: t.column(c).to_numpy().astype(np.int64) for c in _COUNTS}
        bad = pc.indices_nonzero(pc.is_valid(t.column("error"))).to_numpy()  # rows with an error only
        picked = t.select(["error_stage", "error_kind", "error"]).take(bad).to_pylist()
        self.errors = {int(r): (e["error_stage"], e["error_kind"], e["error"])
                       for r, e in zip(bad, picked, strict=True)}
        self.ids, self.labels = Ragged.nested(t.column("input_ids")), Ragged.nested(t.column("labels"))
        stop_bad = [c.flatten().to_numpy() for c in t.column("stop_bad").chunks]
        self.stop_bad = np.concatenate(stop_bad or [np.zeros(0, np.int32)])
        self.conversations = t.column("conversation")

    def read_order(self) -> np.ndarray:
        """Table rows in read_source's order: the max_samples sample's order, else file order."""
        wanted = self.entry.meta.get("selected")
        if wanted is None:
            return np.arange(len(self.kept))
        wanted = np.asarray(wanted, dtype=np.int64)
        return np.searchsorted(np.sort(wanted), wanted)


@dataclass
class Mixed:
    """Conversations in order, as (table, row) pairs: what mix_sources' list holds, by reference."""

    tables: list[Table]
    src: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, where: np.ndarray) -> Mixed:
        return Mixed(self.tables, self.src[where], self.rows[where])

    def per_table(self, arrays: list[np.ndarray]) -> np.ndarray:
        """arrays[t][row] for every (t, row) of the list."""
        out = np.zeros(len(self.rows), dtype=np.int64)
        for i, a in enumerate(arrays):
            at = self.src == i
            out[at] = a[self.rows[at]]
        return out


def tokenize_source(tokenizer, src: DataSource, key: str, seed: int, settings: Settings, bad: BadRows,
                    num_proc: int, use_cache: bool = True) -> Table:
    """One source tokenized (or its cached tokens mapped); `src` with its format settled."""
    from finetune import __version__

    # The seed samples max_samples rows: the sample itself is drawn when building (it counts the
    # rows) and kept in meta.json, so a hit reads nothing of the source.
    fields = {"source": identity(src, key), "seed": seed if src.max_samples else None,
              "tokenizer": cache.tokenizer_fingerprint(tokenizer), "version": __version__,
              "settings": [settings.train_on, settings.max_length, settings.overflow,
                           None if settings.stops is None else sorted(settings.stops)],
              "code": cache.code_fingerprint()}

    def build(path) -> dict:
        progress = cache.Progress(key)
        wanted = selected(src, key, seed)
        chunks = keep_only(iter_chunks(src, key), wanted)
        batches = cache.map_ordered(encode_chunk, (tokenizer, src, settings), chunks, num_proc)

        def checked():
            n = 0
            for batch in batches:
                if bad.policy == "error" and batch.column("error").null_count < batch.num_rows:
                    first = next(i for i, e in enumerate(batch.column("error").to_pylist()) if e is not None)
                    kind = batch.column("error_kind")[first].as_py()
                    raise (DataError if kind == "data" else TemplateError)(batch.column("error")[first].as_py())
                n += batch.num_rows
                progress.update(n)
                yield batch

        n = cache.write_batches(path, checked(), _schema())
        if n == 0:
            raise DataError(f"{key}: {src.path} holds no rows")
        return {"rows": n, "selected": wanted, "source": src.path, "num_proc": num_proc}

    return Table(cache.build_or_load("sft", fields, build, use_cache), src)


def mix(tables: list[Table], seed: int, bad: BadRows) -> Mixed:
    """mix_sources on references: per source its rows in read order minus those that do not convert
    (reported as they are met), round(weight x rows) of them (whole repeats, a seeded sample)."""
    rng = random.Random(seed)
    src, out = [], []
    for i, t in enumerate(tables):
        order = t.read_order()
        failed = _failed(t, "convert")
        for r in order[failed[order]]:
            bad.handle(DataError(t.errors[int(r)][2]))
        items = order[~failed[order]]
        whole, frac = divmod(t.src.weight, 1.0)
        picked = np.asarray(rng.sample(range(len(items)), round(frac * len(items))), dtype=np.int64)
        rows_ = np.concatenate([np.tile(items, int(whole)), items[picked]])
        out.append(rows_)
        src.append(np.full(len(rows_), i, dtype=np.int64))
    cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64))
    return Mixed(tables, cat(src), cat(out))


def holdout(mixed: Mixed, fraction: float, seed: int) -> tuple[Mixed, Mixed]:
    """sources.split_holdout on references."""
    n = len(mixed)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(n * fraction)), n - 1)
    held = np.zeros(n, dtype=bool)
    held[order[:n_eval]] = True
    return mixed.take(~held), mixed.take(held)


def encoded(mixed: Mixed, key: str, bad: BadRows) -> tuple[Samples, EncodeStats]:
    """encode_conversations on references: its errors reported in its order, its counts, its samples."""
    failed = mixed.per_table([_failed(t, "encode") for t in mixed.tables]).astype(bool)
    for j in np.flatnonzero(failed):
        _, kind, error = mixed.tables[mixed.src[j]].errors[int(mixed.rows[j])]
        bad.handle((DataError if kind == "data" else TemplateError)(error))
    kept = mixed.per_table([t.kept for t in mixed.tables])
    sums = {c: int(mixed.per_table([t.counts[c] for t in mixed.tables]).sum()) for c in _COUNTS}
    stats = EncodeStats(rows=len(mixed), samples=int(kept.sum()), tokens=sums["tokens"],
                        trained_tokens=sums["trained"], truncated=sums["truncated"], dropped=sums["dropped"],
                        no_trained=sums["no_trained"])
    if not stats.samples:
        raise DataError(f"{key}: no sample has a trained token left ({stats.summary()}); "
                        "check tokenizer.max_length and trainer.train_on")
    first = mixed.per_table([t.first[:-1] for t in mixed.tables])
    k = np.arange(stats.samples) - np.repeat(np.cumsum(kept) - kept, kept)
    return Samples(mixed.tables, np.repeat(mixed.src, kept), np.repeat(first, kept) + k), stats


def _failed(t: Table, stage: str) -> np.ndarray:
    """Rows whose conversion (stage "convert") or encoding ("encode") failed."""
    out = np.zeros(len(t.kept), dtype=bool)
    for r, error in t.errors.items():
        out[r] = error[0] == stage
    return out


class Samples(Rows):
    """Samples ({"input_ids", "labels"} lists) read from the memory-mapped tables on access."""

    def __init__(self, tables: list[Table], src: np.ndarray, items: np.ndarray) -> None:
        self.tables, self.src, self.items = tables, src, items

    def __len__(self) -> int:
        return len(self.items)

    def _row(self, i: int):
        t, s = self.tables[self.src[i]], int(self.items[i])
        return {"input_ids": t.ids[s].tolist(), "labels": t.labels[s].tolist()}

    def _gather(self, name: str) -> np.ndarray:
        out = np.zeros(len(self), dtype=np.int64)
        for i, t in enumerate(self.tables):
            at = self.src == i
            out[at] = getattr(t, name)[self.items[at]] if name == "stop_bad" else t.ids.lengths[self.items[at]]
        return out

    def lengths(self) -> np.ndarray:
        return self._gather("lengths")

    def stop_problems(self) -> np.ndarray:
        """Per sample, the token at which a trained turn ends on a non-stop token (-1: none)."""
        return self._gather("stop_bad")


class Conversations(Rows):
    """The conversations of a mixed list, decoded from the cache on access."""

    def __init__(self, mixed: Mixed) -> None:
        self.mixed = mixed

    def __len__(self) -> int:
        return len(self.mixed)

    def _row(self, i: int):
        t = self.mixed.tables[self.mixed.src[i]]
        messages, tools = json.loads(t.conversations[int(self.mixed.rows[i])].as_py())
        return Conversation(messages, f"{t.src.path}: row {int(self.mixed.rows[i])}", tools)


@dataclass
class ChatData:
    train: Samples
    eval: Samples | list
    stats: EncodeStats
    train_conversations: Conversations
    eval_conversations: Conversations | list
    stops_checked: bool
    notes: list[str]


def load_chats(recipe, tokenizer, bad: BadRows) -> ChatData:
    """sft's data: read_conversations + encode_conversations through the cache."""
    seed, t = recipe.run.seed, recipe.tokenizer
    stops = None
    if recipe.trainer.train_on != "all":
        try:
            stops = frozenset(stop_token_ids(tokenizer))
        except (DataError, TemplateError):
            stops = None  # check_learns_to_stop raises it where the check runs
    settings = Settings(recipe.trainer.train_on, t.max_length, t.overflow, stops)
    num_proc = recipe.data.num_proc or cache.default_num_proc()
    notes: list[str] = []

    def tables(sources: list[DataSource], key: str) -> list[Table]:
        out = []
        for i, src in enumerate(sources):
            where = f"{key}.{i}.path"
            table = tokenize_source(tokenizer, settle_format(src, where), where, seed, settings, bad, num_proc,
                                    recipe.data.cache)
            how = "from the cache" if table.entry.hit else f"tokenized ({table.entry.meta['num_proc']} processes)"
            notes.append(f"{key}.{i}: {table.entry.meta['rows']:,} rows {how}")
            out.append(table)
        return out

    train = mix(tables(recipe.data.train, "data.train"), seed, bad)
    if recipe.data.eval:
        evals = mix(tables(recipe.data.eval, "data.eval"), seed, bad)
    elif recipe.data.eval_fraction:
        train, evals = holdout(train, recipe.data.eval_fraction, seed)
    else:
        evals = None
    train_samples, stats = encoded(train, "data.train", bad)
    eval_samples = encoded(evals, "data.eval", bad)[0] if evals is not None and len(evals) else []
    return ChatData(train_samples, eval_samples, stats, Conversations(train),
                    Conversations(evals) if evals is not None else [], stops is not None, notes)
