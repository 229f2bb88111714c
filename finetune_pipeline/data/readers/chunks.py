"""The loop every reader shares: records arrive in batches of raw bytes; each batch goes through Arrow's
multi-threaded JSON reader at once, and a batch it rejects (a malformed record, a value of the wrong type, bytes
that are not UTF-8), or a record missing a required field, is read again record by record so that only the bad
records are quarantined, each with a precise reason. Record hooks and mixed files go record by record.
"""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from finetune_pipeline.data.readers.record_formats import (
    coerce_record,
    detect_format,
    extra_fields,
    formats_of,
    input_schema,
    required_fields,
)
from finetune_pipeline.data.readers.result import FileProblem
from finetune_pipeline.data.readers.text import BadRecord
from finetune_pipeline.spec import SourceSpec

CHUNK_LINES = 131_072  # records per batch (read at call time: tests lower it)
CHUNK_BYTES = 16 << 20  # bytes per batch of a streamed JSON document (its records can be large)
DETECT_SAMPLE = 200


@dataclass
class Batch:
    """Records as raw bytes: record i is ``blob[starts[i]:ends[i]]``; records are separated by newlines."""

    blob: bytes
    starts: np.ndarray
    ends: np.ndarray
    lines: np.ndarray  # 1-based source line of each record

    def __len__(self) -> int:
        return len(self.lines)

    def raw(self, i: int) -> bytes:
        return self.blob[int(self.starts[i]) : int(self.ends[i])]

    def longest(self) -> int:
        return int((self.ends - self.starts).max(initial=0))

    def take(self, keep: np.ndarray) -> Batch:
        return batch_of([self.raw(int(i)) for i in np.flatnonzero(keep)], self.lines[keep])


def batch_of(raws: list[bytes], lines: np.ndarray | list[int]) -> Batch:
    sizes = np.fromiter((len(r) + 1 for r in raws), np.int64, len(raws))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return Batch(b"\n".join(raws), starts, starts + sizes - 1, np.asarray(lines, np.int64))


def load_hook(spec: str, where: str) -> Callable[[Any], Any]:
    """Import ``module:function`` (source.record_hook); FileProblem hook_not_found when that fails."""
    mod_name, _, fn_name = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # noqa: BLE001
        raise FileProblem(
            "hook_not_found",
            f"{where}: cannot import module {mod_name!r} of source.record_hook {spec!r} ({type(exc).__name__}: "
            f"{exc}): put the module on PYTHONPATH of the code location (or install it), or fix the name",
        ) from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise FileProblem(
            "hook_not_found",
            f"{where}: module {mod_name!r} has no function {fn_name!r} (source.record_hook {spec!r}): fix the name",
        )
    return fn


def choose_format(source: SourceSpec, sample: list[Any], where: str, notes: list[str]) -> str:
    """The record format: the hook's (chat), the spec's, or detected from the sample (noted)."""
    if source.record_hook:
        notes.append(f"records converted by the record hook {source.record_hook}")
        return "chat"
    if source.record_format != "auto":
        return source.record_format
    fmt, note = detect_format(sample, source.columns, where)
    notes.append(note)
    return fmt


TableConsumer = Callable[[list[tuple[pa.Table, str]]], None]
_CONSUMER: ContextVar[TableConsumer | None] = ContextVar("table_consumer", default=None)


@contextmanager
def consuming(consumer: TableConsumer | None) -> Iterator[None]:
    """While inside, every Sink hands its tables to ``consumer`` as they are made (a group of (table, record
    format) pairs at a time, in source order; a group of several formats covers one range of lines) instead of
    keeping them: the reader's memory then holds one batch, not the file."""
    token = _CONSUMER.set(consumer)
    try:
        yield
    finally:
        _CONSUMER.reset(token)


class Sink:
    """Turns parsed records into Arrow tables, one schema per record format, in source order.

    The record format is fixed (chat, sharegpt, ...), ``mixed`` (each record in the format its own fields show),
    or given by the spec's record hook (raw record in, messages out; the rows are chat). The tables are kept
    (``tables``) or, under ``consuming``, handed on as they are made."""

    def __init__(self, source: SourceSpec, fmt: str, where: str, flush_rows: int | None = None):
        self.consumer = _CONSUMER.get()
        self.flush_rows = flush_rows  # rows kept as Python objects before they become a table (default CHUNK_LINES)
        self.cols = source.columns
        self.fmt = fmt
        self.hook_name = source.record_hook
        self.hook = load_hook(source.record_hook, where) if source.record_hook else None
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.tables: list[pa.Table] = []
        self.formats: list[str] = []
        self.pending = 0

    @property
    def one_by_one(self) -> bool:
        return self.hook is not None or self.fmt == "mixed"

    def coerce(self, rec: Any) -> tuple[str, dict[str, Any]]:
        cols = self.cols
        if self.hook is not None:
            return "chat", self._hooked(rec)
        if self.fmt == "mixed":
            if not isinstance(rec, dict):
                raise BadRecord("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
            found = formats_of(rec, cols, non_null=True)
            if not found:
                raise BadRecord(
                    "unknown_record_format",
                    f"no record format fits this record (fields: {', '.join(sorted(map(str, rec))[:8]) or 'none'}); "
                    "map its field names with source.columns or convert it with source.record_hook",
                )
            return found[0], coerce_record(rec, cols, found[0])
        return self.fmt, coerce_record(rec, cols, self.fmt)

    def _hooked(self, rec: Any) -> dict[str, Any]:
        cols = self.cols
        try:
            out = self.hook(rec)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - any failure of user code is this row's problem
            raise BadRecord(
                "hook_failed", f"record hook {self.hook_name} raised {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        msgs = out.get("messages") if isinstance(out, dict) else out
        if not isinstance(msgs, list | tuple) or not msgs:
            raise BadRecord(
                "hook_failed",
                f"record hook {self.hook_name} returned {type(out).__name__ if not isinstance(out, list) else 'an empty list'}"
                ", not a non-empty list of {role, content} messages",
            )
        shaped = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and "role" in m and "content" in m):
                raise BadRecord(
                    "hook_failed", f"record hook {self.hook_name}: message {i} is not a {{role, content}} object"
                )
            shaped.append({cols.role: m["role"], cols.content: m["content"]})
        row: dict[str, Any] = {cols.messages: shaped}
        for c in extra_fields(cols):
            if isinstance(rec, dict) and c in rec:
                row[c] = rec[c]
        return coerce_record(row, cols, "chat")

    def add(self, rec: Any, line: int) -> None:
        """Coerce and keep one record; raises BadRecord with the reason when it does not fit."""
        fmt, row = self.coerce(rec)
        row["_line"] = line
        self.rows.setdefault(fmt, []).append(row)
        self.pending += 1
        if self.pending >= (self.flush_rows or CHUNK_LINES):
            self.flush()

    def _emit(self, group: list[tuple[pa.Table, str]]) -> None:
        if self.consumer is not None:
            self.consumer(group)
            return
        for table, fmt in group:
            self.tables.append(table)
            self.formats.append(fmt)

    def append(self, table: pa.Table, fmt: str) -> None:
        self.flush()
        self._emit([(table, fmt)])

    def flush(self) -> None:
        group = [
            (pa.Table.from_pylist(rows, schema=input_schema(self.cols, fmt)), fmt)
            for fmt, rows in self.rows.items()
            if rows
        ]
        self.rows = {}
        self.pending = 0
        if group:
            self._emit(group)


OneByOne = Callable[[Batch, np.ndarray], None]  # reads the given records of a batch one at a time into the sink


def read_batches(
    batches: Iterable[Batch],
    sink: Sink,
    one_by_one: OneByOne,
    *,
    multiline: bool = False,
    split_invalid_utf8: bool = False,
    longest: int | None = None,
) -> None:
    """The shared loop: each batch through Arrow, what Arrow declines record by record (``one_by_one``).

    ``split_invalid_utf8``: only the records that are not UTF-8 go one by one (else the whole batch);
    ``multiline``: records may span lines; ``longest``: the longest record in the file (Arrow's block size),
    default each batch's longest."""
    cols, fmt = sink.cols, sink.fmt
    if sink.one_by_one:
        for b in batches:
            one_by_one(b, np.arange(len(b)))
        sink.flush()
        return
    read_schema = pa.schema([f for f in input_schema(cols, fmt) if f.name != "_line"])
    req = required_fields(cols, fmt)
    extras = extra_fields(cols)
    for b in batches:
        if not len(b):
            continue
        if not _is_utf8(b.blob):  # Arrow would accept bytes that are not UTF-8: such records go one by one
            if not split_invalid_utf8:
                sink.flush()
                one_by_one(b, np.arange(len(b)))
                continue
            bad = np.array([not _is_utf8(b.raw(i)) for i in range(len(b))], bool)
            sink.flush()
            one_by_one(b, np.flatnonzero(bad))
            if bad.all():
                continue
            b = b.take(~bad)
        t = _read_chunk(b.blob, read_schema, extras, longest if longest is not None else b.longest(), multiline)
        if t is None or t.num_rows != len(b):
            sink.flush()
            one_by_one(b, np.arange(len(b)))
            continue
        missing = np.zeros(t.num_rows, bool)  # missing or null required fields: one by one for a precise reason
        for r in req:
            missing |= t.column(r).is_null().to_numpy(zero_copy_only=False)
        t = t.append_column("_line", pa.array(b.lines, pa.int64()))
        if missing.any():
            t = t.filter(pa.array(~missing))
            sink.flush()
            one_by_one(b, np.flatnonzero(missing))
        sink.append(t, fmt)
    sink.flush()


def _is_utf8(b: bytes) -> bool:
    if b.isascii():
        return True
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def sampled(batches: Iterator[Batch], parse: Callable[[bytes], Any]) -> tuple[list[Any], Iterator[Batch]]:
    """The first DETECT_SAMPLE records parsed (for detecting the record format) and the batches, unchanged."""
    first = next(batches, None)
    if first is None:
        return [], iter(())
    sample = [parse(first.raw(i)) for i in range(min(DETECT_SAMPLE, len(first)))]

    def again() -> Iterator[Batch]:
        yield first
        yield from batches

    return sample, again()


_NUMERIC_COLUMN = re.compile(r"Column\(/([^)/]+)\) changed from string to number")


def _read_chunk(
    chunk: bytes, schema: pa.Schema, extras: list[str], max_line: int, multiline: bool = False
) -> pa.Table | None:
    """Arrow's JSON reader on a chunk of lines; None when it rejects the chunk (then it is read line by line).
    Numeric ids, labels or timestamps are read as numbers and turned into strings, as the line-by-line path does.
    ``multiline``: records may span lines (pretty-printed JSON)."""
    for _ in range(len(extras) + 1):
        try:
            t = pajson.read_json(
                io.BytesIO(chunk),
                read_options=pajson.ReadOptions(block_size=max(8 << 20, max_line + 2)),
                parse_options=pajson.ParseOptions(
                    explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=multiline
                ),
            )
        except UnicodeDecodeError:
            return None
        except pa.ArrowInvalid as exc:
            m = _NUMERIC_COLUMN.search(str(exc))
            if not m or m.group(1) not in extras or not pa.types.is_string(schema.field(m.group(1)).type):
                return None
            i = schema.get_field_index(m.group(1))
            schema = schema.set(i, pa.field(m.group(1), pa.int64()))
            continue
        for f in schema:
            if pa.types.is_integer(f.type):
                t = t.set_column(t.schema.get_field_index(f.name), f.name, t.column(f.name).cast(pa.string()))
        return t
    return None


def read_records(
    where: str,
    source: SourceSpec,
    sample: list[Any],
    rows: Iterable[tuple[Any, int]],
    rejects: list,
    raw_of: Callable[[int], str | None] | None = None,
    flush_rows: int | None = None,
) -> tuple[str, Sink, list[str], int]:
    """Records already parsed (CSV rows, Parquet rows), with their line, into the sink one by one. ``sample``: the
    first records (to detect the record format). Returns the record format, the sink, the notes and the number of
    records; ``rejects`` gets the records that do not fit, sorted by line."""
    from finetune_pipeline.data.readers.result import Reject
    from finetune_pipeline.data.readers.text import preview

    notes: list[str] = []
    fmt = (
        choose_format(source, sample[:DETECT_SAMPLE], where, notes)
        if sample
        else (source.record_format if source.record_format != "auto" else "chat")
    )
    sink = Sink(source, fmt, where, flush_rows)
    n = 0
    for rec, line in rows:
        n += 1
        try:
            sink.add(rec, line)
        except BadRecord as b:
            raw = raw_of(line) if raw_of else preview(json.dumps(rec, ensure_ascii=False, default=str))
            rejects.append(Reject(line, b.reason, b.detail, raw or ""))
    sink.flush()
    rejects.sort(key=lambda r: r.line)
    return fmt, sink, notes, n
