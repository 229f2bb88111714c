"""Read a dropped file (JSONL, JSON, CSV, Parquet) into Arrow tables of one record format, never raising for bad rows.

JSONL is parsed by Arrow's multi-threaded JSON reader in chunks of lines; a chunk it rejects (a malformed line,
a value of the wrong type, bytes that are not UTF-8) is parsed again line by line so that only the bad lines
are quarantined. JSON, CSV and Parquet records go through the same per-record type check. Every table carries
``_line``: the 1-based source line of the record (for Parquet: the row number).
"""

from __future__ import annotations

import csv
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


def formats_of(record: dict[str, Any], cols: ColumnMap) -> list[str]:
    """Record formats whose required fields are all present in this record (most specific first)."""
    out = []
    for fmt in ("chat", "sharegpt", "alpaca", "prompt_completion", "text"):
        if all(k in record for k in required_fields(cols, fmt)):
            out.append(fmt)
    return out


def detect_format(records: list[Any], cols: ColumnMap, where: str) -> tuple[str, str]:
    """Pick the record format from sample records; raise FileProblem when no format clearly fits."""
    dicts = [r for r in records if isinstance(r, dict)]
    votes = Counter(f for r in dicts for f in formats_of(r, cols)[:1])
    if dicts and votes:
        fmt, n = votes.most_common(1)[0]
        if n >= 0.8 * len(dicts):
            fields = ", ".join(required_fields(cols, fmt))
            return fmt, f"detected record format '{fmt}' (fields {fields} in {n} of {len(dicts)} sampled records)"
    seen = Counter(k for r in dicts for k in r)
    top = ", ".join(f"{k} ({v})" for k, v in seen.most_common(8)) or "none"
    raise FileProblem(
        "unknown_format",
        f"{where}: cannot tell the record format from the first {len(records)} records (fields seen: {top}). "
        "Set source.record_format to one of chat, sharegpt, alpaca, prompt_completion, text, and map your "
        "field names with source.columns (e.g. columns: {messages: dialog}).",
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


def _scalar_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, bool | int | float):
        return json.dumps(v)
    return json.dumps(v, ensure_ascii=False, sort_keys=True)


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
                if content is not None and not isinstance(content, str):
                    joined = _text_parts(content)
                    if joined is None:
                        raise _Bad(
                            "bad_message",
                            f"message {i} ({role}) {content_k} must be a string, got {type(content).__name__}",
                        )
                    content = joined
                msgs.append({role_k: role, content_k: content})
            out[name] = msgs
        else:
            if v is not None and not isinstance(v, str):
                if isinstance(v, bool | int | float):
                    v = json.dumps(v)
                else:
                    raise _Bad("bad_field", f"field '{name}' must be a string, got {type(v).__name__}")
            out[name] = v
    for c in extra_fields(cols):
        out[c] = _scalar_str(record.get(c))
    return out


def _preview(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        return raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:RAW_PREVIEW_CHARS]
    return raw[:RAW_PREVIEW_CHARS]


def _decode_error(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        return f"byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8: re-export the file as UTF-8"


class _Collector:
    """Accumulates coerced records into Arrow tables of a fixed schema."""

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.rows: list[dict[str, Any]] = []
        self.tables: list[pa.Table] = []

    def add(self, rec: dict[str, Any], line: int) -> None:
        rec["_line"] = line
        self.rows.append(rec)
        if len(self.rows) >= CHUNK_LINES:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.tables.append(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []


def _record_format(source: SourceSpec, sample: list[Any], where: str, notes: list[str]) -> str:
    if source.record_format != "auto":
        return source.record_format
    fmt, note = detect_format(sample, source.columns, where)
    notes.append(note)
    return fmt


def read_jsonl(path: Path, data: bytes, source: SourceSpec) -> ReadResult:
    cols = source.columns
    notes: list[str] = []
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
        fmt = source.record_format if source.record_format != "auto" else "chat"
        return ReadResult("jsonl", fmt, [], [], 0, int(blank.sum()), [f"{path.name}: no records in the file"])
    sample = []
    for i in content_lines[:DETECT_SAMPLE]:
        try:
            sample.append(json.loads(line_bytes(int(i))))
        except (ValueError, UnicodeDecodeError):
            pass
    fmt = _record_format(source, sample, str(path), notes)
    schema = input_schema(cols, fmt)
    read_schema = pa.schema([f for f in schema if f.name != "_line"])
    req = required_fields(cols, fmt)
    coll = _Collector(schema)
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
                coll.add(coerce_record(rec, cols, fmt), i + 1)
            except _Bad as b:
                rejects.append(Reject(i + 1, b.reason, b.detail, _preview(raw)))

    max_line = int(lengths.max(initial=0))
    for c0 in range(0, len(content_lines), CHUNK_LINES):
        idx = content_lines[c0 : c0 + CHUNK_LINES]
        chunk = _join_lines(data, starts, ends, idx)
        t = _read_chunk(chunk, read_schema, extra_fields(cols), max_line)
        if t is None:
            coll.flush()
            per_line(idx)
            continue
        if t.num_rows != len(idx):
            coll.flush()
            per_line(idx)
            continue
        # rows missing a required field (or holding null there) are classified one by one for a precise reason
        missing = np.zeros(t.num_rows, bool)
        for r in req:
            missing |= t.column(r).is_null().to_numpy(zero_copy_only=False)
        t = t.append_column("_line", pa.array(idx + 1, pa.int64()))
        if missing.any():
            t = t.filter(pa.array(~missing))
            coll.flush()
            per_line(idx[missing])
        coll.flush()
        coll.tables.append(t)
    coll.flush()
    return ReadResult("jsonl", fmt, coll.tables, rejects, len(content_lines), int(blank.sum()), notes)


_NUMERIC_COLUMN = re.compile(r"Column\(/([^)/]+)\) changed from string to number")


def _read_chunk(chunk: bytes, schema: pa.Schema, extras: list[str], max_line: int) -> pa.Table | None:
    """Arrow's JSON reader on a chunk of lines; None when it rejects the chunk (then it is read line by line).
    Numeric ids, labels or timestamps are read as numbers and turned into strings, as the line-by-line path does."""
    for _ in range(len(extras) + 1):
        try:
            t = pajson.read_json(
                io.BytesIO(chunk),
                read_options=pajson.ReadOptions(block_size=max(8 << 20, max_line + 2)),
                parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
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


def read_json_document(path: Path, data: bytes, source: SourceSpec) -> ReadResult:
    """A JSON array of records, or an object holding one; a document cut off mid-way keeps its complete records."""
    text = data.decode("utf-8", errors="surrogateescape")
    newlines = np.array([m.start() for m in re.finditer("\n", text)], np.int64)
    dec = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    notes: list[str] = []
    if pos >= len(text):
        raise FileProblem("empty_file", f"{path}: the file is empty: drop a file with at least one record")
    if text[pos] == "{":
        key = source.json_records_key
        if key is None:
            try:
                obj, _ = dec.raw_decode(text, pos)
            except ValueError:
                obj = None  # cut off: take the first list-valued key below
            if isinstance(obj, dict):
                lists = [k for k, v in obj.items() if isinstance(v, list)]
                if len(lists) != 1:
                    if formats_of(obj, source.columns):  # the whole document is one record
                        return _from_records(path, source, [obj], [_line_at(pos, newlines)], [], notes, "json")
                    raise FileProblem(
                        "no_records",
                        f"{path}: the JSON object has {len(lists)} lists ({', '.join(lists) or 'none'}), not one list "
                        "of records: set source.json_records_key to the key that holds them",
                    )
                key = lists[0]
        pattern = re.escape(json.dumps(key)) if key else r'"(?:[^"\\]|\\.)*"'
        m = re.compile(pattern + r"\s*:\s*\[").search(text, pos)
        if m is None:
            raise FileProblem(
                "no_records",
                f"{path}: no list of records under key {key!r}: set source.json_records_key to the key that holds them",
            )
        notes.append(f"records read from key {text[m.start() : m.end()].split(':')[0].strip()}")
        pos = m.end() - 1
    if text[pos] != "[":
        raise FileProblem(
            "invalid_json",
            f"{path}: a .json file must hold an array of records or an object; use .jsonl for JSON Lines",
        )
    records: list[Any] = []
    lines: list[int] = []
    rejects: list[Reject] = []
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return _from_records(path, source, records, lines, rejects, notes, "json")
    while pos < len(text):
        try:
            rec, end = dec.raw_decode(text, pos)
        except ValueError as exc:
            line = _line_at(pos, newlines)
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"the JSON array is cut off or malformed at line {line} ({getattr(exc, 'msg', exc)}) after "
                    f"{len(records)} complete records; the records before it are kept. Re-export the file in full.",
                    _preview(text[pos:].encode("utf-8", errors="surrogateescape")),
                )
            )
            notes.append(f"array cut at line {line} after {len(records)} complete records")
            break
        records.append(rec)
        lines.append(_line_at(pos, newlines))
        pos = _skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] == "]":
            break
        elif pos >= len(text):
            notes.append(f"array not closed after {len(records)} records (the file ends there; all were kept)")
        else:
            line = _line_at(pos, newlines)
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"expected ',' or ']' at line {line} after {len(records)} records; "
                    "the rest of the file is not read. Fix the file and drop it again.",
                    _preview(text[pos:].encode("utf-8", errors="surrogateescape")),
                )
            )
            break
    return _from_records(path, source, records, lines, rejects, notes, "json")


def _line_at(pos: int, newlines: np.ndarray) -> int:
    return int(np.searchsorted(newlines, pos, side="left")) + 1


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n\ufeff":
        pos += 1
    return pos


def _has_surrogates(rec: Any) -> bool:
    s = json.dumps(rec, ensure_ascii=False) if not isinstance(rec, str) else rec
    return any("\udc80" <= ch <= "\udcff" for ch in s)


def _from_records(
    path: Path,
    source: SourceSpec,
    records: list[Any],
    lines: list[int],
    rejects: list[Reject],
    notes: list[str],
    file_format: str,
    raw_of: Callable[[int], str] | None = None,
) -> ReadResult:
    fmt = (
        _record_format(source, records[:DETECT_SAMPLE], str(path), notes)
        if records
        else (source.record_format if source.record_format != "auto" else "chat")
    )
    structural = len(rejects)  # rejects that are not records (a cut-off tail, a broken CSV row)
    coll = _Collector(input_schema(source.columns, fmt))
    for rec, line in zip(records, lines, strict=True):
        raw = raw_of(line) if raw_of else _preview(json.dumps(rec, ensure_ascii=False))
        if _has_surrogates(rec):
            rejects.append(
                Reject(line, "invalid_utf8", "the record holds bytes that are not UTF-8: re-export as UTF-8", raw)
            )
            continue
        try:
            coll.add(coerce_record(rec, source.columns, fmt), line)
        except _Bad as b:
            rejects.append(Reject(line, b.reason, b.detail, raw))
    coll.flush()
    rejects.sort(key=lambda r: r.line)
    return ReadResult(file_format, fmt, coll.tables, rejects, len(records) + structural, 0, notes)


def read_csv(path: Path, data: bytes, source: SourceSpec) -> ReadResult:
    """CSV with a header row; list-valued fields (messages, conversations) hold JSON text."""
    cols = source.columns
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise FileProblem("empty_file", f"{path}: the CSV file is empty: it needs a header row and records") from None
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
    res = _from_records(path, source, records, lines, rejects, [], "csv", raw_of=raws.get)
    res.blank_lines = blank
    return res


def read_parquet(path: Path, source: SourceSpec) -> ReadResult:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileProblem("unreadable_file", f"{path}: not a readable Parquet file ({exc}): re-export it") from exc
    records = table.to_pylist()
    return _from_records(path, source, records, list(range(1, len(records) + 1)), [], [], "parquet")


def file_format_of(path: Path, source: SourceSpec) -> str:
    if source.file_format != "auto":
        return source.file_format
    suffixes = [s.lower() for s in path.suffixes]
    for s in reversed(suffixes):
        if s in EXTENSIONS:
            return EXTENSIONS[s]
    raise FileProblem(
        "unknown_file_format",
        f"{path}: cannot tell the file format from the extension '{path.suffix}': name it .jsonl, .json, .csv or "
        ".parquet, or set source.file_format",
    )


def read_file(path: Path, source: SourceSpec, stored_name: str | None = None) -> ReadResult:
    """Read one drop. Raises FileProblem only for failures of the whole file (it names the file and the fix)."""
    ff = file_format_of(Path(stored_name) if stored_name else path, source)
    if ff == "parquet":
        return read_parquet(path, source)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if ff == "jsonl":
        return read_jsonl(path, data, source)
    if ff == "json":
        return read_json_document(path, data, source)
    return read_csv(path, data, source)
