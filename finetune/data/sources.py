"""Data: read rows from local files or the Hub, check them against the declared format.

A source is a local file, directory or glob (jsonl, json, parquet, csv, txt) or a Hub dataset id
(loaded through `datasets`, with subset/split/revision). Every row keeps its origin
("file:line" or "dataset[split]:row") so an error deep in a dataset names the exact row.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import DataError, TemplateError
from finetune.recipe.schema import DataSource

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt")

# Required logical columns per format (finetune.data.formats has the optional ones and the rules).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompts": ("prompt",),
    "preference": ("chosen", "rejected"),
}
# A format whose columns are a subset of another's yields to it: prompt + completion rows are
# prompt_completion, not prompts, unless the trainer reads prompts (`expected`).
_SUBSUMED = {"prompts": ("prompt_completion", "preference", "alpaca")}
_DETECT_ROWS = 5


@dataclass
class Row:
    data: dict
    origin: str  # "data/x.jsonl:12" — for error messages


def source_files(src: DataSource, key: str) -> list[Path] | None:
    """The local files of a source, or None when it is a Hub dataset id."""
    p = Path(src.path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        if not files:
            raise DataError(f"{key}: directory {p} holds no {'/'.join(SUFFIXES)} files")
        return files
    if any(ch in src.path for ch in "*?["):
        files = sorted(f for f in Path().glob(src.path) if f.is_file())
        if not files:
            raise DataError(f"{key}: no files match {src.path!r}")
        return files
    return None


def read_source(src: DataSource, key: str, seed: int = 0) -> list[Row]:
    """All rows of one source (after max_samples), in file order."""
    files = source_files(src, key)
    if src.format == "auto":
        src = with_format(src, key, rows=_peek(src, files, key))
    rows: list[Row] = []
    if files is None:
        rows = _read_hub(src, key)
    else:
        for f in files:
            rows.extend(_read_file(f, src, key))
    if not rows:
        raise DataError(f"{key}: {src.path} holds no rows")
    if src.max_samples and len(rows) > src.max_samples:
        rows = random.Random(seed).sample(rows, src.max_samples)
    return rows


def with_format(src: DataSource, key: str, expected: str | None = None, rows: list[Row] | None = None) -> DataSource:
    """The source with its format settled: itself when declared, else a copy with the format that
    its first rows' columns name (the recipe itself keeps `auto`, so its recipe.yaml reruns as is).

    `expected` is the format the trainer reads: chosen when the rows fit it among others (prompt +
    answer rows for ppo are `prompts`; prompt + completion rows are `prompt_completion` elsewhere).
    """
    if src.format != "auto":
        return src
    rows = rows if rows is not None else _peek(src, source_files(src, key), key)
    if _role_turns_under_conversations(rows, src):
        # Many Hub sets keep role/content turns under `conversations`: they are messages.
        src = src.model_copy(update={"columns": {"messages": "conversations", **src.columns}})
    return src.model_copy(update={"format": detect_format(rows, src, key, expected)})


def detect_format(rows: list[Row], src: DataSource, key: str, expected: str | None = None) -> str:
    per_row = []
    for row in rows[:_DETECT_ROWS]:
        present = {name for name in _logical_columns(src) if src.columns.get(name, name) in row.data}
        row_fits = {f for f, need in FORMAT_COLUMNS.items() if all(c in present for c in need)}
        if src.columns.get("messages") == src.columns.get("conversations", "conversations"):
            row_fits.discard("sharegpt")  # the same column mapped to messages (role/content turns)
        per_row.append((row.origin, row_fits))
    fits = set.intersection(*(f for _, f in per_row)) if per_row else set()
    if not fits and len({frozenset(f) for _, f in per_row}) > 1:
        shown = "; ".join(f"{o}: {', '.join(sorted(f)) or 'none'}" for o, f in per_row)
        raise DataError(f"{key}: format auto: the first rows fit different formats ({shown}); "
                        f"set {key.removesuffix('.path')}.format")
    if expected in fits:
        fits = {expected}
    for weaker, stronger in _SUBSUMED.items():
        if weaker in fits and fits & set(stronger):
            fits.discard(weaker)
    if len(fits) == 1:
        fmt = fits.pop()
        _note_detected(key, src, fmt)
        return fmt
    columns = ", ".join(sorted(map(str, rows[0].data))) if rows else "none"
    where = rows[0].origin if rows else key
    if fits:
        raise DataError(f"{where}: format auto: the rows fit {' and '.join(sorted(fits))} (columns: {columns}); "
                        f"set {key.removesuffix('.path')}.format")
    known = "; ".join(f"{f}: {', '.join(c)}" for f, c in FORMAT_COLUMNS.items())
    raise DataError(f"{where}: format auto: columns {columns} fit no format ({known}); "
                    f"set {key.removesuffix('.path')}.format and map columns with columns: {{logical: yours}}")


def _logical_columns(src: DataSource) -> set[str]:
    return {c for cols in FORMAT_COLUMNS.values() for c in cols} | set(src.columns)


def _role_turns_under_conversations(rows: list[Row], src: DataSource) -> bool:
    name = src.columns.get("conversations", "conversations")
    if "messages" in src.columns or not rows or not all(name in r.data for r in rows[:_DETECT_ROWS]):
        return False
    turns = rows[0].data[name]
    return isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "role" in turns[0]


_NOTED: set[tuple] = set()


def _note_detected(key: str, src: DataSource, fmt: str) -> None:
    # Once per source and process: a source is read by the plan, the audit and the trainer.
    if (key, src.path, fmt) not in _NOTED:
        _NOTED.add((key, src.path, fmt))
        from finetune.console import info

        info(f"{key.removesuffix('.path')}: format auto -> {fmt} ({src.path})")


def _peek(src: DataSource, files: list[Path] | None, key: str) -> list[Row]:
    """The first rows of a source, without reading a large JSONL file whole."""
    if files is None:
        return _read_hub(src.model_copy(update={"split": f"{src.split}[:{_DETECT_ROWS}]"}), key)
    rows: list[Row] = []
    for f in files:
        if f.suffix == ".jsonl":
            rows += _read_jsonl(f, src, key, limit=_DETECT_ROWS - len(rows))
        else:
            rows += _read_file(f, src, key)[:_DETECT_ROWS - len(rows)]
        if len(rows) >= _DETECT_ROWS:
            break
    return rows


def _read_file(path: Path, src: DataSource, key: str) -> list[Row]:
    suffix = path.suffix
    if suffix == ".txt":
        return _read_txt(path, src, key)
    if suffix == ".jsonl":
        return _read_jsonl(path, src, key)
    if suffix == ".json":
        try:
            data = json.loads(_read_text(path, src, key))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} style
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return [_as_row(r, f"{path}[{i}]") for i, r in enumerate(data)]
    if suffix in (".parquet", ".csv"):
        import datasets

        try:
            ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - pyarrow/pandas raise many kinds; one line is enough
            raise DataError(f"{path}: cannot read: {str(e).splitlines()[0]}") from None
        return [Row(dict(r), f"{path}:row {i}") for i, r in enumerate(ds)]
    raise DataError(f"{path}: unsupported file type {suffix!r} (use {', '.join(SUFFIXES)})")


def _read_jsonl(path: Path, src: DataSource, key: str, limit: int | None = None) -> list[Row]:
    rows = []
    with _open(path) as f:
        lines = f if _line_by_line(src.encoding) else _read_text(path, src, key).splitlines()
        for lineno, raw in enumerate(lines, 1):
            if limit is not None and len(rows) >= limit:
                break
            line = _decode(raw, src, key, path, lineno) if isinstance(raw, bytes) else raw
            if not line.strip():
                continue
            rows.append(json_row(line, f"{path}:{lineno}"))
    return rows


def json_row(line: str, origin: str) -> Row:
    """One JSONL line as a row; DataError naming the file and line when it is not a JSON object."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{origin}: not valid JSON: {e.msg}") from None
    return _as_row(value, origin)


def _open(path: Path):
    """The file in binary (lines are decoded one by one, so an error names its line), or one line
    naming the file when the system refuses it (permissions, a directory, a vanished file)."""
    try:
        return path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _decode(raw: bytes, src: DataSource, key: str, path: Path, lineno: int = 1) -> str:
    try:
        return raw.decode(src.encoding)
    except UnicodeDecodeError as e:
        # Name the line and column of the first bad byte (counted from the start of `raw`).
        line = lineno + raw[:e.start].count(b"\n")
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not valid {src.encoding} (byte 0x{raw[e.start]:02x} at column {column}); "
                        f"if the file has another encoding, set {key.removesuffix('.path')}.encoding "
                        f"(e.g. latin-1, cp1252, utf-16)") from None


def _read_text(path: Path, src: DataSource, key: str) -> str:
    with _open(path) as f:
        return _decode(f.read(), src, key, path)


def _line_by_line(encoding: str) -> bool:
    # UTF-16/32 newlines are not the byte 0x0a: such files are decoded whole, then split.
    return not encoding.lower().replace("_", "-").startswith(("utf-16", "utf-32", "utf16", "utf32"))


def _read_txt(path: Path, src: DataSource, key: str) -> list[Row]:
    """A .txt file is a sequence of documents separated by blank lines."""
    text = _read_text(path, src, key)
    docs = [d.strip("\n") for d in text.split("\n\n")]
    rows, line = [], 1
    for doc in docs:
        if doc.strip():
            rows.append(Row({"text": doc}, f"{path}:{line}"))
        line += doc.count("\n") + 2
    return rows


def _as_row(value, origin: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(f"{origin}: expected a JSON object per row, got {type(value).__name__}")
    return Row(value, origin)


def _read_hub(src: DataSource, key: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(src.path, src.subset, split=src.split, revision=src.revision)
    except Exception as e:  # noqa: BLE001 - offline, missing split, auth: all are user-fixable
        raise DataError(f"{key}: cannot load Hub dataset {src.path!r} (split {src.split!r}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return [Row(dict(r), f"{src.path}[{src.split}]:row {i}") for i, r in enumerate(ds)]


def column(row: Row, src: DataSource, name: str):
    """A row's value for a logical column, honouring the source's column mapping."""
    actual = src.columns.get(name, name)
    if actual not in row.data:
        present = ", ".join(sorted(map(str, row.data))) or "none"
        raise DataError(f"{row.origin}: missing column {actual!r} for format {src.format!r} "
                        f"(present: {present}; map it with columns: {{{name}: <column>}})")
    return row.data[actual]


def read_texts(sources: list[DataSource], key: str, seed: int) -> list[tuple[str, str]]:
    """(text, origin) for every row of `text`-format sources."""
    out = []
    for i, src in enumerate(sources):
        src = with_format(src, f"{key}.{i}.path", expected="text")
        if src.format != "text":
            raise DataError(f"{key}.{i}.format: this trainer reads format 'text', got {src.format!r}")
        for row in read_source(src, f"{key}.{i}.path", seed):
            text = column(row, src, "text")
            if not isinstance(text, str):
                raise DataError(f"{row.origin}: column 'text' must be a string, got {type(text).__name__}")
            if text.strip():
                out.append((text, row.origin))
    if not out:
        raise DataError(f"{key}: the data sources hold no non-empty text")
    return out


def split_holdout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out split; at least one item on each side."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(items) * fraction)), len(items) - 1)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


class BadRows:
    """`data.on_bad_row`: a malformed row is fatal (`error`, default) or skipped and counted (`skip`),
    with the first few reported by origin, until `data.max_bad_rows` is exceeded."""

    def __init__(self, policy: str = "error", limit: int = 0) -> None:
        self.policy, self.limit, self.count = policy, limit, 0

    def handle(self, error: Exception) -> None:
        if self.policy == "error":
            raise error
        self.count += 1
        if self.count <= 3:
            from finetune.console import info

            info(f"[yellow]skipped bad row:[/] {error}")
        if self.count > self.limit:
            raise DataError(f"more than {self.limit} bad rows (data.max_bad_rows); the last: {error}")


def mix_sources(sources: list[DataSource], key: str, seed: int, convert, bad: BadRows | None = None) -> list:
    """Rows of several sources, each converted by `convert(row, src)` and scaled by its weight.

    A weight w makes a source contribute round(w x rows) rows per epoch: whole repeats for the
    integer part and a seeded sample for the fraction (w=0.5 keeps half, w=2 doubles it).
    """
    rng = random.Random(seed)
    out = []
    for i, src in enumerate(sources):
        items = []
        src = with_format(src, f"{key}.{i}.path")
        for row in read_source(src, f"{key}.{i}.path", seed):
            try:
                items.append(convert(row, src))
            except DataError as e:
                (bad or BadRows()).handle(e)
        whole, frac = divmod(src.weight, 1.0)
        out.extend(items * int(whole))
        out.extend(rng.sample(items, round(frac * len(items))))
    return out


@dataclass
class EncodeStats:
    """What encoding did to a data set: reported by the plan and by `finetune data`."""

    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    no_trained: int = 0  # samples left with nothing to train (e.g. truncated before the answer)

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / max(self.tokens, 1)

    def summary(self) -> str:
        return (f"{self.samples:,} samples from {self.rows:,} rows, {self.tokens:,} tokens "
                f"({100 * self.trained_fraction:.1f}% trained), {self.truncated} truncated, "
                f"{self.dropped} dropped, {self.no_trained} without trained tokens (skipped)")


def encode_conversations(tokenizer, conversations: list, train_on: str, max_length: int, overflow: str,
                         key: str, bad: BadRows | None = None) -> tuple[list[dict], EncodeStats]:
    """Chat-templated samples with label masks; samples with no trained token are skipped."""
    from finetune.data.tokenizer import encode_chat_turns

    stats = EncodeStats(rows=len(conversations))
    samples = []
    for conv in conversations:
        try:  # the row's origin names it better than an index into the mixed list
            encs = encode_chat_turns(tokenizer, conv.messages, train_on, max_length, overflow, conv.tools)
        except (DataError, TemplateError) as e:
            (bad or BadRows()).handle(type(e)(f"{conv.origin}: {e}"))
            continue
        for enc in encs:
            if enc is None:
                stats.dropped += 1
                continue
            stats.truncated += bool(enc.get("truncated"))
            trained = sum(label != -100 for label in enc["labels"][1:])
            if trained == 0:
                stats.no_trained += 1
                continue
            stats.samples += 1
            stats.tokens += len(enc["input_ids"])
            stats.trained_tokens += trained
            samples.append({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    if not samples:
        raise DataError(f"{key}: no sample has a trained token left ({stats.summary()}); "
                        "check tokenizer.max_length and trainer.train_on")
    return samples, stats
