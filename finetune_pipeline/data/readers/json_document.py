"""JSON documents: an array of records, or an object holding lists of records; a document cut off mid-way keeps
its complete records. The records' bytes go through the shared loop (chunks.py) as batches, like JSON Lines."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from finetune_pipeline.data.readers import chunks, json_stream
from finetune_pipeline.data.readers.record_formats import formats_of
from finetune_pipeline.data.readers.result import Dropped, FileProblem, ReadResult, Reject
from finetune_pipeline.data.readers.text import RAW_PREVIEW_CHARS, BadRecord, load_json, preview
from finetune_pipeline.spec import ColumnMap, SourceSpec


class HoldsJsonLines(Exception):
    """The .json file holds several JSON values (JSON Lines): the dispatcher reads it as JSON Lines."""


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


def _latin1_key(key: str) -> str:
    """A key as it appears, quoted, in a document read as Latin-1."""
    return '"' + key.encode("utf-8").decode("latin-1") + '"'


def read(dropped: Dropped, source: SourceSpec, from_jsonl: bool = False, stream: bool = True) -> ReadResult:
    """A JSON array of records, an object holding a list of records, or an object of records keyed by id; a
    document cut off mid-way keeps its complete records. Arrays, objects with one list and id-keyed objects are
    streamed (json_stream.py: memory holds a block and a batch of records, not the file); ``stream=False`` and the
    other objects read the document whole."""
    where = dropped.where
    with dropped.open() as f:
        s = json_stream.Stream(f)
        pos = s.ws(0)
        if pos >= len(s.text):
            raise FileProblem("empty_file", f"{where}: the file is empty: drop a file with at least one record")
        c = s.char(pos)
        if c not in "[{":
            raise FileProblem(
                "invalid_json",
                f"{where}: a .json file must hold an array of records or an object holding one (it starts with "
                f"{preview(s.raw(pos, pos + 20))!r}); use .jsonl for JSON Lines, .csv for CSV",
            )
        if not stream:
            return _read_whole(dropped, source, from_jsonl)
        if c == "[":
            return _streamed(where, source, [], lambda rejects, notes: _array(s, pos, rejects, notes))
        by_key = source.json_records_key and source.json_records != "values"
        shape = None if by_key else _shape(s, pos, from_jsonl)
    cols = source.columns
    if shape is None:
        if source.json_records == "values":  # cut off or malformed: the records before the fault are kept
            note = "records read from the values of the top-level object (source.json_records: values)"
            return _streamed(where, source, [note], lambda rejects, notes: _values(dropped, cols.id, rejects))
        return _read_whole(dropped, source, from_jsonl)
    lists = [m for m in shape if m[1] == "list"]
    objects = sum(1 for m in shape if m[1] == "object")
    values = source.json_records == "values" or (
        bool(shape) and objects == len(shape) and not formats_of({m[0]: None for m in shape}, cols)
    )
    if values:
        how = "source.json_records: values" if source.json_records == "values" else "detected"
        note = f"records read from the values of the top-level object ({len(shape)} records keyed by id, {how})"
        if cols.id:
            note += f"; a record without '{cols.id}' gets its key as its id"
        return _streamed(where, source, [note], lambda rejects, notes: _values(dropped, cols.id, rejects))
    if len(lists) == 1:
        key, _, start, line = lists[0]
        note = f"records read from key {json.dumps(key)}"
        return _streamed(where, source, [note], lambda rejects, notes: _array_at(dropped, start, line, rejects, notes))
    if formats_of({m[0]: None for m in shape}, cols) or source.record_hook:  # the whole document is one record
        return _read_whole(dropped, source, from_jsonl)
    raise FileProblem(
        "no_records",
        f"{where}: the JSON object has {len(lists)} lists ({', '.join(m[0] for m in lists) or 'none'}), not one list "
        f"of records; the top level is {_describe(shape)}. {_fix(shape)}",
    )


Member = tuple[str, str, int, int]  # key, kind (list, object, value), where its value starts, its line


def _shape(s: json_stream.Stream, pos: int, from_jsonl: bool) -> list[Member] | None:
    """The top-level object's members (lists stepped over, never held); None when it is cut off or malformed."""
    out: list[Member] = []
    try:
        for key, start, _, line, obj in json_stream.members(s, pos, skip_lists=True):
            kind = "list" if obj is ... else "object" if isinstance(obj, dict) else "value"
            out.append((key, kind, start, line))
    except json_stream.Malformed:
        return None
    after = s.ws(s.after)
    if s.char(after) and not from_jsonl and s.char(after) in "{[":  # several JSON values: JSON Lines in a .json
        raise HoldsJsonLines()
    return out


def _describe(shape: list[Member]) -> str:
    n = Counter(kind for _, kind, _, _ in shape)
    parts = [f"{n[k]} {k}{'s' if n[k] != 1 else ''}" for k in ("list", "object", "value") if n[k]]
    return f"an object of {len(shape)} members ({', '.join(parts) or 'empty'})"


def _fix(shape: list[Member]) -> str:
    objects = sum(1 for m in shape if m[1] == "object")
    fixes = []
    if any(m[1] == "list" for m in shape):
        fixes.append("set source.json_records_key to the key of the list that holds the records")
    if objects:
        fixes.append(
            "set source.json_records: values to read each object value as one record (its key becomes the row id)"
        )
    fixes.append("set source.record_hook to a 'module:function' if the whole object is one record")
    return "To read it: " + "; or ".join(fixes) + "."


def _array(s: json_stream.Stream, pos: int, rejects: list[Reject], notes: list[str]) -> Iterator[tuple[bytes, int]]:
    """The top-level array's records; content after its end is a reject (one array per file)."""
    for raw, line, _ in json_stream.elements(s, pos, rejects, notes):
        yield raw, line
    if s.after >= 0:
        after = s.ws(s.after)
        if s.char(after):
            line = s.at(after)
            rejects.append(
                Reject(
                    line,
                    "invalid_json",
                    f"content after the end of the JSON array at line {line} is not read: put one array per file "
                    "(or use JSON Lines, one record per line)",
                    s.preview_at(after),
                )
            )


def _array_at(
    dropped: Dropped, start: int, line: int, rejects: list[Reject], notes: list[str]
) -> Iterator[tuple[bytes, int]]:
    """The records of the list starting at byte ``start`` (on ``line``)."""
    with dropped.open_at(start) as f:
        s = json_stream.Stream(f, start, line)
        s.ws(0)
        for raw, rec_line, _ in json_stream.elements(s, 0, rejects, notes):
            yield raw, rec_line


def _values(dropped: Dropped, id_field: str | None, rejects: list[Reject]) -> Iterator[tuple[bytes, int]]:
    """The top-level object's values as records; a record without the id field gets its key there."""
    with dropped.open() as f:
        s = json_stream.Stream(f)
        pos = s.ws(0)
        count = 0
        try:
            for key, start, end, line, obj in json_stream.members(s, pos, skip_lists=False):
                raw = s.raw(start - s.base, end - s.base)
                if id_field and isinstance(obj, dict) and _latin1(id_field) not in obj:
                    sep = b"" if not obj else b", "
                    head = json.dumps({id_field: key}, ensure_ascii=False).encode()[:-1]
                    raw = head + sep + raw[1:].lstrip()
                count += 1
                yield raw, line
        except json_stream.Malformed as exc:
            line = s.at(exc.pos)
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"the JSON object is cut off or malformed at line {line} after {count} complete records; "
                    "the records before it are kept. Re-export the file in full.",
                    s.preview_at(exc.pos),
                )
            )


def _latin1(key: str) -> str:
    """A key as raw_decode sees it in a document read as Latin-1."""
    return key.encode("utf-8").decode("latin-1")


def _streamed(
    where: str,
    source: SourceSpec,
    notes: list[str],
    scan: Callable[[list[Reject], list[str]], Iterator[tuple[bytes, int]]],
) -> ReadResult:
    """Records from ``scan`` (bytes, line) in batches through the shared loop. The scan's rejects (a cut-off
    tail) are not records but count as rows in; its notes follow ``notes``, the record-format note comes last."""
    scan_rejects: list[Reject] = []
    scan_notes: list[str] = []
    counted = [0]

    def batches() -> Iterator[chunks.Batch]:
        raws: list[bytes] = []
        lines: list[int] = []
        size, first = 0, True
        for raw, line in scan(scan_rejects, scan_notes):
            raws.append(raw)
            lines.append(line)
            size += len(raw)
            counted[0] += 1
            full = len(raws) >= chunks.CHUNK_LINES or size >= chunks.CHUNK_BYTES
            if full and (not first or len(raws) >= chunks.DETECT_SAMPLE):
                yield chunks.batch_of(raws, lines)
                raws, lines, size, first = [], [], 0, False
        if raws:
            yield chunks.batch_of(raws, lines)

    sample, stream = chunks.sampled(batches(), load_json)
    fmt_notes: list[str] = []
    if sample:
        fmt = chunks.choose_format(source, sample, where, fmt_notes)
    elif not scan_rejects:
        raise FileProblem(
            "no_records",
            f"{where}: the JSON document holds no records (an empty list): drop a file with at least one record",
        )
    else:
        fmt = source.record_format if source.record_format != "auto" else "chat"
    sink = chunks.Sink(source, fmt, where)
    rejects: list[Reject] = []

    def one_by_one(b: chunks.Batch, idx: np.ndarray) -> None:
        for i in idx.tolist():
            rec, line = load_json(b.raw(i)), int(b.lines[i])
            try:
                sink.add(rec, line)
            except BadRecord as bad:
                raw = preview(json.dumps(rec, ensure_ascii=False, default=str))
                rejects.append(Reject(line, bad.reason, bad.detail, raw))

    chunks.read_batches(stream, sink, one_by_one, multiline=True)
    rejects = sorted(scan_rejects + rejects, key=lambda r: r.line)
    notes = notes + scan_notes + fmt_notes
    return ReadResult("json", fmt, sink.tables, rejects, counted[0] + len(scan_rejects), 0, notes, sink.formats)


def _read_whole(dropped: Dropped, source: SourceSpec, from_jsonl: bool = False) -> ReadResult:
    """The document read whole (for objects that need it: source.json_records_key, a cut-off object, an object
    that is one record; and the reference the streamed reading is tested against).

    The structure is walked with the stdlib's C scanner (json raw_decode) over the bytes read as Latin-1, so that
    character positions are byte positions and each record keeps its span and source line; the records' bytes then
    go through Arrow's JSON reader in chunks (as JSONL does), and only the format-detection sample, records Arrow
    rejects, and mixed / hook files are turned into Python objects."""
    where = dropped.where
    data = dropped.read_bytes()
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
            obj = load_json(data[pos:end])
        except ValueError:
            obj, end = None, len(text)  # cut off: take the first list under the key below
        after = _ws_end(text, end)
        if obj is not None and after < len(text) and not from_jsonl:
            if text[after] in "{[":  # several JSON values: JSON Lines in a .json file
                raise HoldsJsonLines()
        if isinstance(obj, dict):
            top_lists = [k for k, v in obj.items() if isinstance(v, list)]
            if key is None:
                if len(top_lists) != 1:
                    if formats_of(obj, source.columns) or source.record_hook:  # the whole document is one record
                        return _records(where, source, data, [(pos, end)], [lines.at(pos)], [], notes)
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
            f"{preview(data[pos : pos + 20])!r}); use .jsonl for JSON Lines, .csv for CSV",
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
                    preview(data[after : after + RAW_PREVIEW_CHARS * 4]),
                )
            )
    return _records(where, source, data, spans, rec_lines, rejects, notes)


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
                    preview(data[pos : pos + RAW_PREVIEW_CHARS * 4]),
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
                    preview(data[pos : pos + RAW_PREVIEW_CHARS * 4]),
                )
            )
            return -1
    return -1


def _batches(data: bytes, spans: list[tuple[int, int]], lines: list[int]) -> Iterator[chunks.Batch]:
    n = chunks.CHUNK_LINES
    for c0 in range(0, len(spans), n):
        yield chunks.batch_of([data[a:b] for a, b in spans[c0 : c0 + n]], lines[c0 : c0 + n])


def _records(
    where: str,
    source: SourceSpec,
    data: bytes,
    spans: list[tuple[int, int]],
    lines: list[int],
    rejects: list[Reject],
    notes: list[str],
) -> ReadResult:
    """The records at ``spans`` (their source ``lines``) through the shared loop; ``rejects`` so far are not
    records (a cut-off tail) but count as rows in."""
    if not spans and not rejects:
        raise FileProblem(
            "no_records",
            f"{where}: the JSON document holds no records (an empty list): drop a file with at least one record",
        )
    sample = [load_json(data[a:b]) for a, b in spans[: chunks.DETECT_SAMPLE]]
    fmt = (
        chunks.choose_format(source, sample, where, notes)
        if spans
        else (source.record_format if source.record_format != "auto" else "chat")
    )
    structural = len(rejects)
    sink = chunks.Sink(source, fmt, where)

    def one_by_one(b: chunks.Batch, idx: np.ndarray) -> None:
        for i in idx.tolist():
            rec, line = load_json(b.raw(i)), int(b.lines[i])
            try:
                sink.add(rec, line)
            except BadRecord as bad:
                rejects.append(
                    Reject(line, bad.reason, bad.detail, preview(json.dumps(rec, ensure_ascii=False, default=str)))
                )

    chunks.read_batches(_batches(data, spans, lines), sink, one_by_one, multiline=True)
    rejects.sort(key=lambda r: r.line)
    return ReadResult("json", fmt, sink.tables, rejects, len(spans) + structural, 0, notes, sink.formats)
