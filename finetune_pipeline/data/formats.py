"""Read a dropped file (JSONL, JSON, CSV, Parquet) into Arrow tables of one record format, never raising for bad rows.

JSONL is parsed by Arrow's multi-threaded JSON reader in chunks of lines; a chunk it rejects (a malformed line,
a value of the wrong type, bytes that are not UTF-8) is parsed again line by line so that only the bad lines
are quarantined. JSON, CSV and Parquet records go through the same per-record type check. Every table carries
``_line``: the 1-based source line of the record (for Parquet: the row number).

Whole-file failures raise FileProblem naming the file the user dropped (``source_name``) and a fix that works:
an empty file (empty_file), a file without records (no_records), binary data (binary_file), a file that is not
JSON Lines (not_jsonl), an unknown or mixed record format (unknown_format), an ambiguous records key.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from finetune_pipeline.spec import ColumnMap, SourceSpec

RAW_PREVIEW_CHARS = 2000
CHUNK_LINES = 131_072
DETECT_SAMPLE = 200
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class FileProblem(ValueError):
    """The file as a whole cannot be read: names the file and the fix."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Reject:
    line: int
    reason: str
    detail: str
    raw: str


@dataclass
class ReadResult:
    file_format: str
    record_format: str
    tables: list[pa.Table]
    rejects: list[Reject]
    rows_in: int
    blank_lines: int
    notes: list[str] = field(default_factory=list)
    table_formats: list[str] = field(default_factory=list)  # record format of each table (mixed files: several)

    def __post_init__(self) -> None:
        if not self.table_formats:
            self.table_formats = [self.record_format] * len(self.tables)


def _msg_type(cols: ColumnMap, fmt: str) -> pa.DataType:
    role, content = (cols.role, cols.content) if fmt == "chat" else (cols.sharegpt_role, cols.sharegpt_content)
    return pa.list_(pa.struct([(role, pa.string()), (content, pa.string())]))


def format_fields(cols: ColumnMap, fmt: str) -> dict[str, pa.DataType]:
    """The fields a record format reads, with their Arrow types (required ones first)."""
    s = pa.string()
    return {
        "chat": {cols.messages: _msg_type(cols, "chat")},
        "sharegpt": {cols.conversations: _msg_type(cols, "sharegpt"), cols.system: s},
        "alpaca": {cols.instruction: s, cols.output: s, cols.input: s, cols.system: s},
        "prompt_completion": {cols.prompt: s, cols.completion: s, cols.system: s},
        "text": {cols.text: s},
    }[fmt]


def required_fields(cols: ColumnMap, fmt: str) -> list[str]:
    return {
        "chat": [cols.messages],
        "sharegpt": [cols.conversations],
        "alpaca": [cols.instruction, cols.output],
        "prompt_completion": [cols.prompt, cols.completion],
        "text": [cols.text],
    }[fmt]


def extra_fields(cols: ColumnMap) -> list[str]:
    return [c for c in (cols.id, cols.label, cols.timestamp) if c]


def input_schema(cols: ColumnMap, fmt: str) -> pa.Schema:
    fields = dict(format_fields(cols, fmt))
    for c in extra_fields(cols):
        fields.setdefault(c, pa.string())
    return pa.schema(list(fields.items()) + [("_line", pa.int64())])


def formats_of(record: dict[str, Any], cols: ColumnMap, non_null: bool = False) -> list[str]:
    """Record formats whose required fields are all present (with ``non_null``: and not null) in this record
    (most specific first). Mixed files use ``non_null``: CSV and Parquet rows hold every column, null where unused."""
    out = []
    for fmt in ("chat", "sharegpt", "alpaca", "prompt_completion", "text"):
        req = required_fields(cols, fmt)
        if all(record.get(k) is not None for k in req) if non_null else all(k in record for k in req):
            out.append(fmt)
    return out


def detect_format(records: list[Any], cols: ColumnMap, where: str) -> tuple[str, str]:
    """Pick the record format from sample records; raise FileProblem (with a fix that works) when none clearly fits."""
    dicts = [r for r in records if isinstance(r, dict)]
    votes = Counter(f for r in dicts for f in formats_of(r, cols)[:1])
    if dicts and votes:
        fmt, n = votes.most_common(1)[0]
        if n >= 0.8 * len(dicts):
            fields = ", ".join(required_fields(cols, fmt))
            return fmt, f"detected record format '{fmt}' (fields {fields} in {n} of {len(dicts)} sampled records)"
        if len(votes) > 1 and sum(votes.values()) >= 0.8 * len(dicts):
            mix = ", ".join(f"{f} in {k}" for f, k in votes.most_common())
            raise FileProblem(
                "unknown_format",
                f"{where}: the records mix record formats ({mix} of {len(dicts)} sampled records): set "
                "source.record_format: mixed to read each record in the format its fields show",
            )
    if records and not dicts:
        raise FileProblem(
            "unknown_format",
            f"{where}: the records are not JSON objects (the first is a {type(records[0]).__name__}): each record "
            'must be an object such as {"messages": [{"role": "user", "content": "..."}, ...]}; for other shapes '
            "set source.record_hook to a 'module:function' that turns one record into its messages",
        )
    seen = Counter(k for r in dicts for k in r)
    top = ", ".join(f"{k} ({v})" for k, v in seen.most_common(8)) or "none"
    lists = [k for k, _ in seen.most_common() if any(isinstance(r.get(k), list) for r in dicts)]
    strings = [k for k, _ in seen.most_common() if any(isinstance(r.get(k), str) for r in dicts) and k != cols.id]
    if lists:
        example = f"record_format: chat, columns: {{messages: {lists[0]}}} (and role / content for the message keys)"
    elif len(strings) >= 2:
        example = f"record_format: prompt_completion, columns: {{prompt: {strings[0]}, completion: {strings[1]}}}"
    elif strings:
        example = f"record_format: text, columns: {{text: {strings[0]}}}"
    else:
        example = "record_format: chat, columns: {messages: YOUR_FIELD}"
    raise FileProblem(
        "unknown_format",
        f"{where}: no record format fits the first {len(records)} records (fields seen: {top}). Map your field "
        f"names onto one with source.record_format and source.columns, e.g. {example}; for nested or custom "
        "records set source.record_hook to a 'module:function' that returns a record's messages. Formats and "
        "their fields: chat (messages), sharegpt (conversations), alpaca (instruction, output), prompt_completion "
        "(prompt, completion), text (text).",
    )


def _text_parts(value: Any) -> str | None:
    """A message content given as a list of parts ({type: text, text: ...}) becomes their joined text."""
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


class _Bad(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _utf8(s: str, what: str) -> str:
    """``s`` unchanged when it can be stored as UTF-8; else _Bad invalid_utf8 naming the offending character.
    Bytes that were not UTF-8 in the file arrive as U+DC80..U+DCFF (surrogateescape); a JSON escape of half a
    surrogate pair (\\ud83d alone) arrives as a lone surrogate."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError as exc:
        ch = s[exc.start]
        if "\udc80" <= ch <= "\udcff":
            raise _Bad(
                "invalid_utf8",
                f"{what} holds the byte 0x{ord(ch) - 0xDC00:02x} at character {exc.start}, which is not UTF-8: "
                "re-export the file as UTF-8",
            ) from None
        raise _Bad(
            "invalid_utf8",
            f"{what} holds a lone surrogate escape \\u{ord(ch):04x} at character {exc.start} (half of an emoji or "
            "symbol cut in two): fix or remove this record",
        ) from None


def safe_text(s: str) -> str:
    """``s`` with characters that cannot be stored as UTF-8 replaced by U+FFFD (for previews and details)."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in s)


def _scalar_str(v: Any, what: str = "a field") -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return _utf8(v, what)
    if isinstance(v, bool | int | float):
        return json.dumps(v)
    return _utf8(json.dumps(v, ensure_ascii=False, sort_keys=True), what)


def coerce_record(record: Any, cols: ColumnMap, fmt: str) -> dict[str, Any]:
    """Check a parsed record's types for the format and return it shaped like ``input_schema``;
    raise _Bad(reason, detail) otherwise. Semantic checks (roles, order, lengths) come later, column-wise."""
    if not isinstance(record, dict):
        raise _Bad("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in required_fields(cols, fmt) if k not in record]
    if missing:
        others = [f for f in formats_of(record, cols) if f != fmt]
        if others:
            raise _Bad(
                "mixed_format",
                f"this record looks like '{others[0]}' but the file is '{fmt}' (fields: {', '.join(sorted(record)[:8])}); "
                "put records of one format per file",
            )
        raise _Bad(
            "missing_field",
            f"field '{missing[0]}' is missing (fields present: {', '.join(sorted(record)[:8]) or 'none'}); "
            "map your field names with source.columns",
        )
    nulls = [k for k in required_fields(cols, fmt) if record[k] is None]
    if nulls:
        raise _Bad("null_field", f"field '{nulls[0]}' is null")
    out: dict[str, Any] = {}
    for name, typ in format_fields(cols, fmt).items():
        v = record.get(name)
        if pa.types.is_list(typ):
            role_k, content_k = typ.value_type.field(0).name, typ.value_type.field(1).name
            if v is None:
                out[name] = None
                continue
            if not isinstance(v, list):
                raise _Bad("messages_not_list", f"'{name}' must be a list of messages, got {type(v).__name__}")
            msgs = []
            for i, m in enumerate(v):
                if not isinstance(m, dict) or role_k not in m or content_k not in m:
                    raise _Bad("bad_message", f"message {i} must be an object with '{role_k}' and '{content_k}'")
                role, content = m[role_k], m[content_k]
                if not isinstance(role, str):
                    raise _Bad("bad_message", f"message {i} has a {type(role).__name__} as {role_k}, not a string")
                role = _utf8(role, f"message {i} {role_k}")
                if content is not None and not isinstance(content, str):
                    joined = _text_parts(content)
                    if joined is None:
                        raise _Bad(
                            "bad_message",
                            f"message {i} ({role}) {content_k} must be a string, got {type(content).__name__}",
                        )
                    content = joined
                if content is not None:
                    content = _utf8(content, f"message {i} ({role}) {content_k}")
                msgs.append({role_k: role, content_k: content})
            out[name] = msgs
        else:
            if v is not None and not isinstance(v, str):
                if isinstance(v, bool | int | float):
                    v = json.dumps(v)
                else:
                    raise _Bad("bad_field", f"field '{name}' must be a string, got {type(v).__name__}")
            out[name] = _utf8(v, f"field '{name}'") if v is not None else None
    for c in extra_fields(cols):
        out[c] = _scalar_str(record.get(c), f"field '{c}'")
    return out


def _preview(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        return raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:RAW_PREVIEW_CHARS]
    return safe_text(raw[:RAW_PREVIEW_CHARS])


def _decode_error(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        return f"byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8: re-export the file as UTF-8"


class _Sink:
    """Turns parsed records into Arrow tables, one schema per record format, in source order.

    The record format is fixed (chat, sharegpt, ...), ``mixed`` (each record in the format its own fields show),
    or given by the spec's record hook (raw record in, messages out; the rows are chat)."""

    def __init__(self, source: SourceSpec, fmt: str, where: str):
        self.cols = source.columns
        self.fmt = fmt
        self.hook_name = source.record_hook
        self.hook = load_hook(source.record_hook, where) if source.record_hook else None
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.tables: list[pa.Table] = []
        self.formats: list[str] = []
        self.pending = 0

    def coerce(self, rec: Any) -> tuple[str, dict[str, Any]]:
        cols = self.cols
        if self.hook is not None:
            return "chat", self._hooked(rec)
        if self.fmt == "mixed":
            if not isinstance(rec, dict):
                raise _Bad("not_an_object", f"expected a JSON object, got {type(rec).__name__}")
            found = formats_of(rec, cols, non_null=True)
            if not found:
                raise _Bad(
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
            raise _Bad(
                "hook_failed", f"record hook {self.hook_name} raised {type(exc).__name__}: {str(exc)[:300]}"
            ) from None
        msgs = out.get("messages") if isinstance(out, dict) else out
        if not isinstance(msgs, list | tuple) or not msgs:
            raise _Bad(
                "hook_failed",
                f"record hook {self.hook_name} returned {type(out).__name__ if not isinstance(out, list) else 'an empty list'}"
                ", not a non-empty list of {role, content} messages",
            )
        shaped = []
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and "role" in m and "content" in m):
                raise _Bad(
                    "hook_failed", f"record hook {self.hook_name}: message {i} is not a {{role, content}} object"
                )
            shaped.append({cols.role: m["role"], cols.content: m["content"]})
        row: dict[str, Any] = {cols.messages: shaped}
        for c in extra_fields(cols):
            if isinstance(rec, dict) and c in rec:
                row[c] = rec[c]
        return coerce_record(row, cols, "chat")

    def add(self, rec: Any, line: int) -> None:
        """Coerce and keep one record; raises _Bad with the reason when it does not fit."""
        fmt, row = self.coerce(rec)
        row["_line"] = line
        self.rows.setdefault(fmt, []).append(row)
        self.pending += 1
        if self.pending >= CHUNK_LINES:
            self.flush()

    def append(self, table: pa.Table, fmt: str) -> None:
        self.flush()
        self.tables.append(table)
        self.formats.append(fmt)

    def flush(self) -> None:
        for fmt, rows in self.rows.items():
            if rows:
                self.tables.append(pa.Table.from_pylist(rows, schema=input_schema(self.cols, fmt)))
                self.formats.append(fmt)
        self.rows = {}
        self.pending = 0


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


def _record_format(source: SourceSpec, sample: list[Any], where: str, notes: list[str]) -> str:
    if source.record_hook:
        notes.append(f"records converted by the record hook {source.record_hook}")
        return "chat"
    if source.record_format != "auto":
        return source.record_format
    fmt, note = detect_format(sample, source.columns, where)
    notes.append(note)
    return fmt


def _is_utf8(b: bytes) -> bool:
    if b.isascii():
        return True
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _not_jsonl(path: Path, data: bytes, source: SourceSpec, where: str, first_bad: tuple[int, str]) -> ReadResult:
    """No sampled line of a .jsonl file is a JSON object: read a JSON document in it, or say what the file is."""
    head = data.lstrip()[:1]
    if head in (b"[", b"{"):
        try:
            res = read_json_document(path, data, source, where, from_jsonl=True)
        except FileProblem:
            res = None
        if res is not None and (res.rows_in > 1 or not res.rejects):
            res.notes.insert(0, "the file holds one JSON document, not JSON Lines: read as a JSON document")
            return res
    line, why = first_bad
    sample = data[:4096]
    first = sample.split(b"\n", 1)[0]
    if not _is_utf8(sample[: sample.rfind(b"\n") + 1] or sample[:1024]):
        hint = "it is not UTF-8 text: re-export it as UTF-8 JSON Lines (one JSON object per line)"
    elif first.count(b",") >= 1 and not first.lstrip().startswith((b"{", b"[", b'"')):
        hint = (
            "its first line looks like a CSV header: name the file .csv (and set source.file_glob to match it) "
            "or set source.file_format: csv"
        )
    else:
        hint = "each line must be one JSON object; re-export the file as JSON Lines"
    raise FileProblem(
        "not_jsonl",
        f"{where}: not JSON Lines: none of the first lines is a JSON object (line {line}: {why}); {hint}",
    )


def read_jsonl(path: Path, data: bytes, source: SourceSpec, where: str | None = None) -> ReadResult:
    where = where or str(path)
    cols = source.columns
    notes: list[str] = []
    if not data:
        raise FileProblem("empty_file", f"{where}: the file is empty (0 bytes): drop a file with at least one record")
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(data) and data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    n_lines = len(ends)

    def line_bytes(i: int) -> bytes:
        return data[starts[i] : ends[i]]

    lengths = ends - starts
    maybe_blank = np.flatnonzero(lengths <= 2)  # empty, "\r", or a short whitespace-only line
    blank = np.zeros(n_lines, bool)
    for i in maybe_blank:
        blank[i] = not line_bytes(int(i)).strip()
    # long whitespace-only lines are rare: check lines that start with whitespace
    ws_start = np.flatnonzero((lengths > 2) & np.isin(buf[np.minimum(starts, len(buf) - 1)], (9, 13, 32)))
    for i in ws_start:
        blank[i] = not line_bytes(int(i)).strip()
    content_lines = np.flatnonzero(~blank)
    if len(content_lines) == 0:
        raise FileProblem(
            "no_records",
            f"{where}: the file holds no records ({n_lines} blank lines): drop a file with one JSON object per line",
        )
    sample = []
    first_bad: tuple[int, str] | None = None
    for i in content_lines[:DETECT_SAMPLE]:
        raw = line_bytes(int(i))
        try:
            rec = json.loads(raw)
            sample.append(rec)
        except (ValueError, UnicodeDecodeError) as exc:
            if first_bad is None:
                bad = _decode_error(raw)
                first_bad = (int(i) + 1, bad or f"{getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')}")
    if not any(isinstance(r, dict) for r in sample) and first_bad is not None and source.record_format == "auto":
        return _not_jsonl(path, data, source, where, first_bad)
    fmt = _record_format(source, sample, where, notes)
    sink = _Sink(source, fmt, where)
    rejects: list[Reject] = []

    def per_line(idx: np.ndarray) -> None:
        for i in idx:
            i = int(i)
            raw = line_bytes(i)
            bad = _decode_error(raw)
            if bad:
                rejects.append(Reject(i + 1, "invalid_utf8", bad, _preview(raw)))
                continue
            try:
                rec = json.loads(raw)
            except ValueError as exc:
                msg = getattr(exc, "msg", str(exc))
                col = getattr(exc, "colno", None)
                rejects.append(Reject(i + 1, "invalid_json", f"{msg} at column {col}", _preview(raw)))
                continue
            try:
                sink.add(rec, i + 1)
            except _Bad as b:
                rejects.append(Reject(i + 1, b.reason, b.detail, _preview(raw)))

    if sink.hook is not None or fmt == "mixed":  # each record on its own
        per_line(content_lines)
        sink.flush()
        return ReadResult("jsonl", fmt, sink.tables, rejects, len(content_lines), int(blank.sum()), notes, sink.formats)
    schema = input_schema(cols, fmt)
    read_schema = pa.schema([f for f in schema if f.name != "_line"])
    req = required_fields(cols, fmt)
    max_line = int(lengths.max(initial=0))
    for c0 in range(0, len(content_lines), CHUNK_LINES):
        idx = content_lines[c0 : c0 + CHUNK_LINES]
        chunk = _join_lines(data, starts, ends, idx)
        if not _is_utf8(chunk):  # Arrow would accept bytes that are not UTF-8: such lines go line by line
            bad_lines = np.array([not _is_utf8(line_bytes(int(i))) for i in idx], bool)
            sink.flush()
            per_line(idx[bad_lines])
            idx = idx[~bad_lines]
            if not len(idx):
                continue
            chunk = _join_lines(data, starts, ends, idx)
        t = _read_chunk(chunk, read_schema, extra_fields(cols), max_line)
        if t is None or t.num_rows != len(idx):
            sink.flush()
            per_line(idx)
            continue
        # rows missing a required field (or holding null there) are classified one by one for a precise reason
        missing = np.zeros(t.num_rows, bool)
        for r in req:
            missing |= t.column(r).is_null().to_numpy(zero_copy_only=False)
        t = t.append_column("_line", pa.array(idx + 1, pa.int64()))
        if missing.any():
            t = t.filter(pa.array(~missing))
            sink.flush()
            per_line(idx[missing])
        sink.append(t, fmt)
    sink.flush()
    return ReadResult("jsonl", fmt, sink.tables, rejects, len(content_lines), int(blank.sum()), notes, sink.formats)


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


def _join_lines(data: bytes, starts: np.ndarray, ends: np.ndarray, idx: np.ndarray) -> bytes:
    """The given lines joined by newlines, without a Python loop when they are contiguous."""
    if idx[-1] - idx[0] + 1 == len(idx):  # a contiguous run of lines (no blank lines inside)
        return data[starts[idx[0]] : ends[idx[-1]]]
    return b"\n".join(data[starts[i] : ends[i]] for i in idx.tolist())


_WS = re.compile(r"[ \t\r\n\ufeff]*")


def _ws_end(text: str, pos: int) -> int:
    return _WS.match(text, pos).end()  # type: ignore[union-attr]


class _Lines:
    """1-based line of increasing character positions (counts newlines since the last call: linear overall)."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _json_path(path: tuple[Any, ...]) -> str:
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _key_places(obj: Any, key: str, cols: ColumnMap) -> list[tuple[tuple[Any, ...], bool]]:
    """Every place, in document order, where ``key`` holds a list: (path to the list, whether the object holding
    the key looks like a record itself or sits inside another such list, i.e. the key is a field of records)."""
    out: list[tuple[tuple[Any, ...], bool]] = []
    stack: list[tuple[Any, tuple[Any, ...], bool]] = [(obj, (), False)]
    while stack:
        node, path, inside = stack.pop()
        if isinstance(node, dict):
            children = []
            for k, v in node.items():
                here = inside
                if k == key and isinstance(v, list):
                    field_of_record = inside or (any(isinstance(p, int) for p in path) and bool(formats_of(node, cols)))
                    out.append((path + (k,), field_of_record))
                    here = True
                if isinstance(v, dict | list):
                    children.append((v, path + (k,), here))
            stack.extend(reversed(children))
        elif isinstance(node, list):
            stack.extend(reversed([(v, path + (i,), inside) for i, v in enumerate(node) if isinstance(v, dict | list)]))
    return out


def _decode_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # bad bytes become U+DC80..U+DCFF and their records invalid_utf8
        return data.decode("utf-8", errors="surrogateescape")


def _load(raw: bytes) -> Any:
    """One JSON value from bytes; bytes that are not UTF-8 become U+DC80..U+DCFF (then invalid_utf8 rows)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        return json.loads(raw.decode("utf-8", errors="surrogateescape"))


def _latin1_key(key: str) -> str:
    """A key as it appears, quoted, in a document read as Latin-1."""
    return '"' + key.encode("utf-8").decode("latin-1") + '"'


class _Spans:
    """The records of a JSON document by their byte spans, parsed on access (a sequence for _from_records)."""

    def __init__(self, data: bytes, spans: list[tuple[int, int]]):
        self.data, self.spans = data, spans

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [_load(self.data[a:b]) for a, b in self.spans[i]]
        a, b = self.spans[i]
        return _load(self.data[a:b])


def read_json_document(
    path: Path, data: bytes, source: SourceSpec, where: str | None = None, from_jsonl: bool = False
) -> ReadResult:
    """A JSON array of records, or an object holding lists of records; a document cut off mid-way keeps its
    complete records.

    The structure is walked with the stdlib's C scanner (json raw_decode) over the bytes read as Latin-1, so that
    character positions are byte positions and each record keeps its span and source line; the records' bytes then
    go through Arrow's JSON reader in chunks (as JSONL does), and only the format-detection sample, records Arrow
    rejects, and mixed / hook files are turned into Python objects."""
    where = where or str(path)
    text = data.decode("latin-1")  # structure only: one character per byte
    dec = json.JSONDecoder()
    pos = _ws_end(text, 0)
    notes: list[str] = []
    lines = _Lines(text)
    if pos >= len(text):
        raise FileProblem("empty_file", f"{where}: the file is empty: drop a file with at least one record")
    starts: list[int] = []
    if text[pos] == "{":
        key = source.json_records_key
        try:
            _, end = dec.raw_decode(text, pos)
            obj = _load(data[pos:end])
        except ValueError:
            obj, end = None, len(text)  # cut off: take the first list under the key below
        after = _ws_end(text, end)
        if obj is not None and after < len(text) and not from_jsonl:
            if text[after] in "{[":  # several JSON values: JSON Lines in a .json file
                res = read_jsonl(path, data, source, where)
                res.notes.insert(0, "the .json file holds JSON Lines (one object per line): read as JSON Lines")
                return res
        if isinstance(obj, dict):
            top_lists = [k for k, v in obj.items() if isinstance(v, list)]
            if key is None:
                if len(top_lists) != 1:
                    if formats_of(obj, source.columns) or source.record_hook:  # the whole document is one record
                        return _from_records(where, source, [obj], [lines.at(pos)], [], notes, "json")
                    raise FileProblem(
                        "no_records",
                        f"{where}: the JSON object has {len(top_lists)} lists ({', '.join(top_lists) or 'none'}), not "
                        "one list of records: set source.json_records_key to the key that holds them",
                    )
                key = top_lists[0]
                places = _key_places(obj, key, source.columns)
                chosen = [i for i, (p, _) in enumerate(places) if p == (key,)]
            else:
                places = _key_places(obj, key, source.columns)
                if not places:
                    raise FileProblem(
                        "no_records",
                        f"{where}: no list under key {key!r} anywhere in the document (lists at the top: "
                        f"{', '.join(top_lists) or 'none'}): set source.json_records_key to the key that holds them",
                    )
                in_records = [p for p, inside in places if inside]
                if in_records:
                    enclosing = next((p[:i] for p in in_records for i in range(len(p)) if isinstance(p[i], int)), ())
                    hint = (
                        f"set source.json_records_key: {enclosing[-1]} (the list holding the records)"
                        if enclosing and isinstance(enclosing[-1], str)
                        else "set source.json_records_key to the key of the list that holds the records"
                    )
                    shown = ", ".join(_json_path(p) for p, _ in places[:5])
                    raise FileProblem(
                        "ambiguous_records_key",
                        f"{where}: source.json_records_key {key!r} occurs in {len(places)} places ({shown}"
                        f"{', ...' if len(places) > 5 else ''}), also inside records, so it is a field of the records "
                        f"rather than the list of them: {hint}",
                    )
                chosen = list(range(len(places)))
            pattern = re.compile(r"(?<!\\)" + re.escape(_latin1_key(key)) + r"\s*:\s*\[")
            found = [m.end() - 1 for m in pattern.finditer(text, pos)]
            if len(found) != len(places):  # the key written with escapes, or duplicate keys: fall back to a search
                found = found[: len(chosen)]
                chosen = list(range(len(found)))
            starts = [found[i] for i in chosen]
            if len(chosen) > 1 or places[chosen[0]][0] != (key,):
                shown = ", ".join(_json_path(places[i][0]) for i in chosen[:10])
                notes.append(f"records read from {len(chosen)} lists under key {key!r}: {shown}")
            else:
                notes.append(f"records read from key {json.dumps(key)}")
        else:
            key = key or r'(?:[^"\\]|\\.)*'
            m = re.compile(
                (re.escape(_latin1_key(key)) if source.json_records_key else f'"{key}"') + r"\s*:\s*\["
            ).search(text, pos)
            if m is None:
                raise FileProblem(
                    "no_records",
                    f"{where}: no list of records under key {key!r} (the JSON object is cut off or malformed): "
                    "re-export the file in full, or set source.json_records_key to the key that holds the records",
                )
            found_key = data[m.start() : m.end()].decode("utf-8", "replace").split(":")[0].strip()
            notes.append(f"records read from key {found_key}")
            starts = [m.end() - 1]
    elif text[pos] == "[":
        starts = [pos]
    else:
        raise FileProblem(
            "invalid_json",
            f"{where}: a .json file must hold an array of records or an object holding one (it starts with "
            f"{_preview(data[pos : pos + 20])!r}); use .jsonl for JSON Lines, .csv for CSV",
        )
    rec_lines: list[int] = []
    rejects: list[Reject] = []
    spans: list[tuple[int, int]] = []  # each record's text
    end = pos
    for start in starts:
        end = _read_array(text, data, start, dec, lines, rec_lines, rejects, notes, spans)
    if len(starts) == 1 and starts[0] == pos and end >= 0:  # a top-level array: nothing may follow it
        after = _ws_end(text, end)
        if after < len(text):
            line = lines.at(after)
            rejects.append(
                Reject(
                    line,
                    "invalid_json",
                    f"content after the end of the JSON array at line {line} is not read: put one array per file "
                    "(or use JSON Lines, one record per line)",
                    _preview(data[after : after + RAW_PREVIEW_CHARS * 4]),
                )
            )
    return _from_records(where, source, _Spans(data, spans), rec_lines, rejects, notes, "json", spans=(data, spans))


def _read_array(
    text: str,
    data: bytes,
    pos: int,
    dec: json.JSONDecoder,
    lines: _Lines,
    rec_lines: list[int],
    rejects: list[Reject],
    notes: list[str],
    spans: list[tuple[int, int]],
) -> int:
    """Read the array opening at ``pos``; returns the position after its ']' (-1 when it is cut off)."""
    n = len(text)
    count0 = len(spans)
    pos = _ws_end(text, pos + 1)
    if pos < n and text[pos] == "]":
        return pos + 1
    raw_decode = dec.raw_decode
    while pos < n:
        try:
            _, end = raw_decode(text, pos)
        except ValueError as exc:
            line = lines.at(pos)
            done = len(spans) - count0
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"the JSON array is cut off or malformed at line {line} ({getattr(exc, 'msg', exc)}) after "
                    f"{done} complete records; the records before it are kept. Re-export the file in full.",
                    _preview(data[pos : pos + RAW_PREVIEW_CHARS * 4]),
                )
            )
            notes.append(f"array cut at line {line} after {done} complete records")
            return -1
        rec_lines.append(lines.at(pos))
        spans.append((pos, end))
        pos = _ws_end(text, end)
        c = text[pos] if pos < n else ""
        if c == ",":
            pos = _ws_end(text, pos + 1)
        elif c == "]":
            return pos + 1
        elif not c:
            notes.append(f"array not closed after {len(spans) - count0} records (the file ends there; all were kept)")
            return -1
        else:
            line = lines.at(pos)
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"expected ',' or ']' at line {line} after {len(spans) - count0} records; "
                    "the rest of the file is not read. Fix the file and drop it again.",
                    _preview(data[pos : pos + RAW_PREVIEW_CHARS * 4]),
                )
            )
            return -1
    return -1


_EMPTY = {
    "json": "the JSON document holds no records (an empty list)",
    "csv": "the CSV file has a header but no rows",
    "parquet": "the Parquet file has no rows",
}


def _from_records(
    where: str,
    source: SourceSpec,
    records: list[Any],
    lines: list[int],
    rejects: list[Reject],
    notes: list[str],
    file_format: str,
    raw_of: Callable[[int], str] | None = None,
    spans: tuple[bytes, list[tuple[int, int]]] | None = None,
) -> ReadResult:
    """Records parsed from a JSON document, CSV or Parquet into tables. With ``spans`` (the document's text and
    each record's span in it) records of a fixed format go through Arrow's JSON reader in chunks, as JSONL does;
    a chunk it rejects, and rows missing a required field, are checked record by record for a precise reason."""
    if not records and not rejects:
        raise FileProblem("no_records", f"{where}: {_EMPTY[file_format]}: drop a file with at least one record")
    fmt = (
        _record_format(source, records[:DETECT_SAMPLE], where, notes)
        if records
        else (source.record_format if source.record_format != "auto" else "chat")
    )
    structural = len(rejects)  # rejects that are not records (a cut-off tail, a broken CSV row)
    sink = _Sink(source, fmt, where)

    def one_by_one(idx: range | np.ndarray) -> None:
        for i in idx:
            rec, line = records[int(i)], lines[int(i)]
            try:
                sink.add(rec, line)
            except _Bad as b:
                raw = raw_of(line) if raw_of else _preview(json.dumps(rec, ensure_ascii=False, default=str))
                rejects.append(Reject(line, b.reason, b.detail, raw or ""))

    if spans is None or sink.hook is not None or fmt == "mixed":
        one_by_one(range(len(records)))
    else:
        data, where_is = spans
        cols = source.columns
        read_schema = pa.schema([f for f in input_schema(cols, fmt) if f.name != "_line"])
        req = required_fields(cols, fmt)
        line_arr = np.asarray(lines, np.int64)
        for c0 in range(0, len(records), CHUNK_LINES):
            idx = np.arange(c0, min(c0 + CHUNK_LINES, len(records)))
            chunk = b"\n".join([data[a:b] for a, b in where_is[c0 : c0 + len(idx)]])
            if not _is_utf8(chunk):  # bytes that are not UTF-8 (Arrow would accept them): record by record
                sink.flush()
                one_by_one(idx)
                continue
            longest = max(b - a for a, b in where_is[c0 : c0 + len(idx)])
            t = _read_chunk(chunk, read_schema, extra_fields(cols), longest, multiline=True)
            if t is None or t.num_rows != len(idx):
                sink.flush()
                one_by_one(idx)
                continue
            missing = np.zeros(t.num_rows, bool)
            for r in req:
                missing |= t.column(r).is_null().to_numpy(zero_copy_only=False)
            t = t.append_column("_line", pa.array(line_arr[idx], pa.int64()))
            if missing.any():
                t = t.filter(pa.array(~missing))
                sink.flush()
                one_by_one(idx[missing])
            sink.append(t, fmt)
    sink.flush()
    rejects.sort(key=lambda r: r.line)
    return ReadResult(file_format, fmt, sink.tables, rejects, len(records) + structural, 0, notes, sink.formats)


def read_csv(path: Path, data: bytes, source: SourceSpec, where: str | None = None) -> ReadResult:
    """CSV with a header row; list-valued fields (messages, conversations) hold JSON text."""
    where = where or str(path)
    cols = source.columns
    text = _decode_text(data).removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise FileProblem("empty_file", f"{where}: the CSV file is empty: it needs a header row and records") from None
    records: list[Any] = []
    lines: list[int] = []
    rejects: list[Reject] = []
    raws: dict[int, str] = {}
    prev_end = reader.line_num
    list_fields = {cols.messages, cols.conversations}
    blank = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rejects.append(Reject(prev_end + 1, "bad_csv_row", f"{exc}: fix the quoting of this row", ""))
            prev_end = reader.line_num
            continue
        line = prev_end + 1
        prev_end = reader.line_num
        if not any(c.strip() for c in row):
            blank += 1
            continue
        raw = _preview(",".join(row))
        if len(row) != len(header):
            rejects.append(
                Reject(
                    line, "bad_csv_row", f"{len(row)} fields where the header has {len(header)}: fix the quoting", raw
                )
            )
            continue
        rec: dict[str, Any] = {}
        bad = None
        for k, v in zip(header, row, strict=True):
            if k in list_fields and v.strip():
                try:
                    rec[k] = json.loads(v)
                except ValueError as exc:
                    bad = Reject(line, "invalid_json", f"column '{k}' is not valid JSON ({exc})", raw)
                    break
            else:
                rec[k] = v if v != "" else None
        if bad:
            rejects.append(bad)
            continue
        records.append(rec)
        lines.append(line)
        raws[line] = raw
    res = _from_records(where, source, records, lines, rejects, [], "csv", raw_of=raws.get)
    res.blank_lines = blank
    return res


def read_parquet(path: Path, source: SourceSpec, where: str | None = None) -> ReadResult:
    import pyarrow.parquet as pq

    where = where or str(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileProblem(
            "unreadable_file", f"{where}: not a readable Parquet file ({exc}): re-export it in full"
        ) from exc
    rejects: list[Reject] = []
    try:
        records = table.to_pylist()
        lines = list(range(1, len(records) + 1))
    except (UnicodeDecodeError, pa.ArrowException):  # a string column holding bytes that are not UTF-8
        records, lines = [], []
        for i in range(table.num_rows):
            try:
                records.append(table.slice(i, 1).to_pylist()[0])
                lines.append(i + 1)
            except (UnicodeDecodeError, pa.ArrowException) as exc:
                rejects.append(Reject(i + 1, "invalid_utf8", f"a text column is not UTF-8 ({exc}): re-export it", ""))
    return _from_records(where, source, records, lines, rejects, [], "parquet")


_MAGIC = [
    (b"\x1f\x8b", "a gzip archive: decompress it (gunzip) and drop the file inside"),
    (b"PK\x03\x04", "a zip archive or an Excel/Office file: unzip it, or save the sheet as CSV (UTF-8)"),
    (b"BZh", "a bzip2 archive: decompress it and drop the file inside"),
    (b"\xfd7zXZ\x00", "an xz archive: decompress it and drop the file inside"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive: decompress it and drop the file inside"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-zip archive: extract it and drop the file inside"),
    (b"%PDF", "a PDF document: export the data as JSONL or CSV"),
    (b"SQLite format 3\x00", "an SQLite database: export the table as JSONL, CSV or Parquet"),
    (b"\xd0\xcf\x11\xe0", "an old Excel/Office file: save the sheet as CSV (UTF-8)"),
]


def _binary_kind(data: bytes, source: SourceSpec) -> str | None:
    """What a file that is not text is (by its first bytes), with the fix; None for text."""
    if data.startswith(b"PAR1"):
        return "a Parquet file: name it .parquet (or set source.file_format: parquet)"
    for magic, what in _MAGIC:
        if data.startswith(magic):
            return what
    head = data[:65536]
    if (
        source.record_format == "auto" and head.count(0) > len(head) // 10
    ):  # NUL bytes are not in UTF-8 text (UTF-16 without BOM, binary)
        return "binary data (it holds NUL bytes; UTF-16 without a byte-order mark looks like this): export it as UTF-8 JSON Lines or CSV"
    return None


def file_format_of(path: Path, source: SourceSpec, where: str | None = None) -> str:
    if source.file_format != "auto":
        return source.file_format
    suffixes = [s.lower() for s in path.suffixes]
    for s in reversed(suffixes):
        if s in EXTENSIONS:
            return EXTENSIONS[s]
    raise FileProblem(
        "unknown_file_format",
        f"{where or path}: cannot tell the file format from the extension '{path.suffix}': name it .jsonl, .json, "
        ".csv or .parquet, or set source.file_format",
    )


def read_file(path: Path, source: SourceSpec, *, source_name: str | None = None) -> ReadResult:
    """Read one drop. Raises FileProblem only for failures of the whole file; it names ``source_name`` (the file
    the user dropped; default: ``path``) and the fix. The file format comes from ``path``'s suffix (the stored
    copy keeps the dropped file's extension) unless source.file_format says otherwise."""
    where = source_name or str(path)
    ff = file_format_of(path, source, where)
    if ff == "parquet":
        return read_parquet(path, source, where)
    data = path.read_bytes()
    if not data:
        raise FileProblem(
            "empty_file",
            f"{where}: the file is empty (0 bytes): drop a file with at least one record (a file still being "
            "written: drop it once it is complete)",
        )
    notes: list[str] = []
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark: text, only another encoding
        try:
            data = data.decode("utf-16").encode("utf-8")
            notes.append("the file is UTF-16: read as UTF-16 (UTF-8 is preferred)")
        except UnicodeDecodeError:
            pass
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    kind = _binary_kind(data, source)
    if kind is not None:
        raise FileProblem("binary_file", f"{where}: this is not a text file but {kind}")
    if not data.strip():
        raise FileProblem(
            "no_records", f"{where}: the file holds only whitespace, no records: drop a file with at least one record"
        )
    if ff == "jsonl":
        res = read_jsonl(path, data, source, where)
    elif ff == "json":
        res = read_json_document(path, data, source, where)
    else:
        res = read_csv(path, data, source, where)
    res.notes[:0] = notes
    return res
