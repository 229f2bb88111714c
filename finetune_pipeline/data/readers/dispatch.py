"""Which reader reads a dropped file, and the only place that decides fallbacks: the file format from the name
(or source.file_format), binary files and archives refused by their first bytes, UTF-16 transcoded, a .jsonl file
that holds one JSON document read as a JSON document, a .json file that holds JSON Lines read as JSON Lines.

Whole-file failures raise FileProblem naming the file the user dropped (``source_name``) and a fix that works:
an empty file (empty_file), a file without records (no_records), binary data (binary_file), a file that is not
JSON Lines (not_jsonl), an unknown or mixed record format (unknown_format), an ambiguous records key.
"""

from __future__ import annotations

from pathlib import Path

from finetune_pipeline.data.readers import csv_rows, json_document, jsonl, parquet_rows
from finetune_pipeline.data.readers.chunks import TableConsumer, consuming
from finetune_pipeline.data.readers.result import Dropped, FileProblem, Reader, ReadResult
from finetune_pipeline.data.readers.text import is_utf8
from finetune_pipeline.spec import SourceSpec

EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
READERS: dict[str, Reader] = {
    "jsonl": jsonl.read,
    "json": json_document.read,
    "csv": csv_rows.read,
    "parquet": parquet_rows.read,
}
HEAD_BYTES = 65536

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


def _binary_kind(head: bytes, source: SourceSpec) -> str | None:
    """What a file that is not text is (by its first bytes), with the fix; None for text."""
    if head.startswith(b"PAR1"):
        return "a Parquet file: name it .parquet (or set source.file_format: parquet)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    head = head[:HEAD_BYTES]
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


def _text_file(path: Path, where: str, source: SourceSpec, notes: list[str]) -> Dropped:
    """The dropped text file, checked from its first bytes (read whole only when it must be transcoded)."""
    with path.open("rb") as f:
        head = f.read(HEAD_BYTES)
    if not head:
        raise FileProblem(
            "empty_file",
            f"{where}: the file is empty (0 bytes): drop a file with at least one record (a file still being "
            "written: drop it once it is complete)",
        )
    dropped = Dropped(path, where)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 with a byte-order mark: text, only another encoding
        try:
            dropped.data = path.read_bytes().decode("utf-16").encode("utf-8")
            head = dropped.data[:HEAD_BYTES]
            notes.append("the file is UTF-16: read as UTF-16 (UTF-8 is preferred)")
        except UnicodeDecodeError:
            pass
    if head.startswith(b"\xef\xbb\xbf"):
        if dropped.data is not None:
            dropped.data = dropped.data[3:]
        else:
            dropped.skip = 3
        head = head[3:]
    kind = _binary_kind(head, source)
    if kind is not None:
        raise FileProblem("binary_file", f"{where}: this is not a text file but {kind}")
    if not head.strip() and not dropped.read_bytes().strip():
        raise FileProblem(
            "no_records", f"{where}: the file holds only whitespace, no records: drop a file with at least one record"
        )
    return dropped


def _not_jsonl(dropped: Dropped, source: SourceSpec, signal: jsonl.NotJsonLines) -> ReadResult:
    """No sampled line of a .jsonl file is a JSON object: read a JSON document in it, or say what the file is."""
    data = dropped.read_bytes()
    if data.lstrip()[:1] in (b"[", b"{"):
        try:
            res = json_document.read(dropped, source, from_jsonl=True)
        except FileProblem:
            res = None
        if res is not None and (res.rows_in > 1 or not res.rejects):
            res.notes.insert(0, "the file holds one JSON document, not JSON Lines: read as a JSON document")
            return res
    sample = data[:4096]
    first = sample.split(b"\n", 1)[0]
    if not is_utf8(sample[: sample.rfind(b"\n") + 1] or sample[:1024]):
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
        f"{dropped.where}: not JSON Lines: none of the first lines is a JSON object (line {signal.line}: "
        f"{signal.why}); {hint}",
    )


def read_file(
    path: Path, source: SourceSpec, *, source_name: str | None = None, on_tables: TableConsumer | None = None
) -> ReadResult:
    """Read one drop. Raises FileProblem only for failures of the whole file; it names ``source_name`` (the file
    the user dropped; default: ``path``) and the fix. The file format comes from ``path``'s suffix (the stored
    copy keeps the dropped file's extension) unless source.file_format says otherwise. With ``on_tables`` the
    tables go to it as they are read (``chunks.consuming``) and the result holds none."""
    with consuming(on_tables):
        return _read_file(path, source, source_name)


def _read_file(path: Path, source: SourceSpec, source_name: str | None) -> ReadResult:
    where = source_name or str(path)
    ff = file_format_of(path, source, where)
    if ff == "parquet":
        return parquet_rows.read(Dropped(path, where), source)
    notes: list[str] = []
    dropped = _text_file(path, where, source, notes)
    try:
        res = READERS[ff](dropped, source)
    except jsonl.NotJsonLines as signal:
        res = _not_jsonl(dropped, source, signal)
    except json_document.HoldsJsonLines:
        res = jsonl.read(dropped, source)
        res.notes.insert(0, "the .json file holds JSON Lines (one object per line): read as JSON Lines")
    res.notes[:0] = notes
    return res
