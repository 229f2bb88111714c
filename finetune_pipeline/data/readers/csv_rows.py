"""CSV with a header row; list-valued fields (messages, conversations) hold JSON text."""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterator
from typing import Any

from finetune_pipeline.data.readers import chunks
from finetune_pipeline.data.readers.result import Dropped, FileProblem, ReadResult, Reject
from finetune_pipeline.data.readers.text import preview
from finetune_pipeline.spec import SourceSpec

FLUSH_BYTES = 16 << 20  # about this much text per table handed on


def read(dropped: Dropped, source: SourceSpec) -> ReadResult:
    """Rows are parsed as the file is read (one row in memory, plus the first rows that decide the record format);
    bytes that are not UTF-8 become U+DC80..U+DCFF and their records invalid_utf8, as in the other readers."""
    where = dropped.where
    text = io.TextIOWrapper(dropped.open(), encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    try:
        header = next(reader)
    except StopIteration:
        raise FileProblem("empty_file", f"{where}: the CSV file is empty: it needs a header row and records") from None
    if header:
        header[0] = header[0].removeprefix("\ufeff")
    rejects: list[Reject] = []
    raws: dict[int, str] = {}  # the previews of the rows not yet through the sink (the sample, then one)
    counts = {"blank": 0, "structural": 0, "chars": 0}
    rows = _rows(reader, header, source, rejects, raws, counts)
    sample = list(itertools.islice(rows, chunks.DETECT_SAMPLE))
    if not sample and not rejects:
        raise FileProblem(
            "no_records", f"{where}: the CSV file has a header but no rows: drop a file with at least one record"
        )
    row_chars = counts["chars"] / max(1, len(sample))  # rows become a table every FLUSH_BYTES or so
    flush = int(min(chunks.CHUNK_LINES, max(256, FLUSH_BYTES // max(row_chars, 1))))
    fmt, sink, notes, n = chunks.read_records(
        where, source, [r for r, _ in sample], itertools.chain(sample, rows), rejects, raw_of=raws.get, flush_rows=flush
    )
    return ReadResult("csv", fmt, sink.tables, rejects, n + counts["structural"], counts["blank"], notes, sink.formats)


def _rows(
    reader: Any, header: list[str], source: SourceSpec, rejects: list[Reject], raws: dict[int, str], counts: dict
) -> Iterator[tuple[dict[str, Any], int]]:
    """(record, line) per well-formed row; rows that are not (quoting, field count, JSON in a list field) go to
    ``rejects`` and are counted in ``counts["structural"]``, blank rows in ``counts["blank"]``."""
    cols = source.columns
    list_fields = {cols.messages, cols.conversations}
    prev_end = reader.line_num

    def reject(r: Reject) -> None:
        rejects.append(r)
        counts["structural"] += 1

    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            reject(Reject(prev_end + 1, "bad_csv_row", f"{exc}: fix the quoting of this row", ""))
            prev_end = reader.line_num
            continue
        line = prev_end + 1
        prev_end = reader.line_num
        if not any(c.strip() for c in row):
            counts["blank"] += 1
            continue
        raw = preview(",".join(row))
        counts["chars"] += sum(len(c) for c in row)
        if len(row) != len(header):
            reject(
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
            reject(bad)
            continue
        raws[line] = raw
        if len(raws) > 2 * chunks.DETECT_SAMPLE:  # the sink is past the oldest ones
            del raws[next(iter(raws))]
        yield rec, line
