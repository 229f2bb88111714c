"""CSV with a header row; list-valued fields (messages, conversations) hold JSON text."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from finetune_pipeline.data.readers import chunks
from finetune_pipeline.data.readers.result import Dropped, FileProblem, ReadResult, Reject
from finetune_pipeline.data.readers.text import decode_text, preview
from finetune_pipeline.spec import SourceSpec


def read(dropped: Dropped, source: SourceSpec) -> ReadResult:
    where = dropped.where
    cols = source.columns
    text = decode_text(dropped.read_bytes()).removeprefix("\ufeff")
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
        raw = preview(",".join(row))
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
    if not records and not rejects:
        raise FileProblem(
            "no_records", f"{where}: the CSV file has a header but no rows: drop a file with at least one record"
        )
    structural = len(rejects)
    rows = zip(records, lines, strict=True)
    fmt, sink, notes, n = chunks.read_records(where, source, records, rows, rejects, raw_of=raws.get)
    return ReadResult("csv", fmt, sink.tables, rejects, n + structural, blank, notes, sink.formats)
