"""Parquet: read batch by batch (memory bounded by the batch, not the file); rows go through the same per-record
checks as CSV rows; a row's line is its 1-based row number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from finetune_pipeline.data.readers import chunks
from finetune_pipeline.data.readers.result import Dropped, FileProblem, ReadResult, Reject
from finetune_pipeline.spec import SourceSpec

BATCH_ROWS = 2048
FLUSH_BYTES = 16 << 20  # rows held as Python objects at most (about), before they become a table


def _rows(batches: Iterator[pa.RecordBatch], rejects: list[Reject]) -> Iterator[tuple[Any, int]]:
    line = 0
    for batch in batches:
        try:
            records = batch.to_pylist()
        except (UnicodeDecodeError, pa.ArrowException):  # a string column holding bytes that are not UTF-8
            records = []
            for i in range(batch.num_rows):
                try:
                    records.append(batch.slice(i, 1).to_pylist()[0])
                except (UnicodeDecodeError, pa.ArrowException) as exc:
                    records.append(exc)
        for rec in records:
            line += 1
            if isinstance(rec, Exception):
                rejects.append(Reject(line, "invalid_utf8", f"a text column is not UTF-8 ({rec}): re-export it", ""))
            else:
                yield rec, line


def read(dropped: Dropped, source: SourceSpec) -> ReadResult:
    import pyarrow.parquet as pq

    where = dropped.where
    unreadable: list[Reject] = []  # rows that are not UTF-8: not records, counted in rows_in
    try:
        pf = pq.ParquetFile(dropped.path, pre_buffer=False)  # pre-buffering reads ahead: memory grows
        if pf.metadata.num_rows == 0:
            raise FileProblem(
                "no_records", f"{where}: the Parquet file has no rows: drop a file with at least one record"
            )
        rows = _rows(pf.iter_batches(batch_size=BATCH_ROWS), unreadable)
        sample = []
        for rec, line in rows:
            sample.append((rec, line))
            if len(sample) >= chunks.DETECT_SAMPLE:
                break

        def all_rows() -> Iterator[tuple[Any, int]]:
            yield from sample
            yield from rows

        rejects: list[Reject] = []
        meta = pf.metadata
        row_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) / meta.num_rows
        flush = int(min(chunks.CHUNK_LINES, max(BATCH_ROWS, FLUSH_BYTES // max(row_bytes, 1))))
        fmt, sink, notes, n = chunks.read_records(
            where, source, [r for r, _ in sample], all_rows(), rejects, flush_rows=flush
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise FileProblem(
            "unreadable_file", f"{where}: not a readable Parquet file ({exc}): re-export it in full"
        ) from exc
    rejects = sorted(rejects + unreadable, key=lambda r: r.line)
    return ReadResult("parquet", fmt, sink.tables, rejects, n + len(unreadable), 0, notes, sink.formats)
