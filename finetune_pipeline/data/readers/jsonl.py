"""JSON Lines: one JSON object per line, read in batches of lines through the shared loop (chunks.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from finetune_pipeline.data.readers import chunks
from finetune_pipeline.data.readers.result import Dropped, FileProblem, ReadResult, Reject
from finetune_pipeline.data.readers.text import BadRecord, decode_error, preview
from finetune_pipeline.spec import SourceSpec


class NotJsonLines(Exception):
    """No sampled line is a JSON object: the dispatcher decides what the file is (a JSON document, CSV, ...)."""

    def __init__(self, line: int, why: str):
        super().__init__(f"line {line}: {why}")
        self.line, self.why = line, why


def _line_index(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start and end of every line, and which lines are blank (whitespace only)."""
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    if len(data) and data[-1:] != b"\n":
        ends = np.append(ends, len(data))
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    lengths = ends - starts
    blank = np.zeros(len(ends), bool)
    for i in np.flatnonzero(lengths <= 2):  # empty, "\r", or a short whitespace-only line
        blank[i] = not data[starts[i] : ends[i]].strip()
    # long whitespace-only lines are rare: check lines that start with whitespace
    ws_start = np.flatnonzero((lengths > 2) & np.isin(buf[np.minimum(starts, len(buf) - 1)], (9, 13, 32)))
    for i in ws_start:
        blank[i] = not data[starts[i] : ends[i]].strip()
    return starts, ends, blank


BLOCK_BYTES = 16 << 20  # the file is read in blocks of whole lines: memory holds a block, not the file


def _blocks(dropped: Dropped) -> Iterator[tuple[bytes, int]]:
    """The file in blocks of whole lines, each with the number of its first line."""
    if dropped.data is not None:  # transcoded by the dispatcher: already in memory
        yield dropped.data, 1
        return
    line, rest = 1, b""
    with dropped.open() as f:
        while True:
            more = f.read(BLOCK_BYTES)
            if not more:
                if rest:
                    yield rest, line
                return
            buf = rest + more
            cut = buf.rfind(b"\n") + 1
            if not cut:
                rest = buf
                continue
            block, rest = buf[:cut], buf[cut:]
            yield block, line
            line += block.count(b"\n")


class _Block:
    """One block's lines: where each starts and ends, which are blank, the number of its first line."""

    def __init__(self, data: bytes, first_line: int):
        self.data, self.first_line = data, first_line
        self.starts, self.ends, self.blank = _line_index(data)
        self.content = np.flatnonzero(~self.blank)

    def raw(self, i: int) -> bytes:
        return self.data[self.starts[i] : self.ends[i]]

    def batches(self) -> Iterator[chunks.Batch]:
        data, starts, ends, n = self.data, self.starts, self.ends, chunks.CHUNK_LINES
        for c0 in range(0, len(self.content), n):
            idx = self.content[c0 : c0 + n]
            lines = idx + self.first_line
            if idx[-1] - idx[0] + 1 == len(idx):  # a contiguous run of lines (no blank lines inside): one slice
                a = int(starts[idx[0]])
                yield chunks.Batch(data[a : int(ends[idx[-1]])], starts[idx] - a, ends[idx] - a, lines)
            else:
                yield chunks.batch_of([data[starts[i] : ends[i]] for i in idx.tolist()], lines)


def read(dropped: Dropped, source: SourceSpec) -> ReadResult:
    where = dropped.where
    blocks = _blocks(dropped)
    first_data, _ = next(blocks, (b"", 1))
    if not first_data:
        raise FileProblem("empty_file", f"{where}: the file is empty (0 bytes): drop a file with at least one record")
    first = _Block(first_data, 1)
    while len(first.content) < chunks.DETECT_SAMPLE:  # the detection sample: the first content lines of the file
        more, _ = next(blocks, (b"", 0))
        if not more:
            break
        first = _Block(first.data + more, 1)
    if len(first.content) == 0:
        raise FileProblem(
            "no_records",
            f"{where}: the file holds no records ({len(first.ends)} blank lines): drop a file with one JSON object "
            "per line",
        )
    sample = []
    first_bad: tuple[int, str] | None = None
    for i in first.content[: chunks.DETECT_SAMPLE]:
        raw = first.raw(i)
        try:
            sample.append(json.loads(raw))
        except (ValueError, UnicodeDecodeError) as exc:
            if first_bad is None:
                bad = decode_error(raw)
                first_bad = (int(i) + 1, bad or f"{getattr(exc, 'msg', exc)} at column {getattr(exc, 'colno', '?')}")
    if not any(isinstance(r, dict) for r in sample) and first_bad is not None and source.record_format == "auto":
        raise NotJsonLines(*first_bad)
    notes: list[str] = []
    fmt = chunks.choose_format(source, sample, where, notes)
    sink = chunks.Sink(source, fmt, where)
    rejects: list[Reject] = []

    def per_line(b: chunks.Batch, idx: np.ndarray) -> None:
        for i in idx.tolist():
            raw, line = b.raw(i), int(b.lines[i])
            bad = decode_error(raw)
            if bad:
                rejects.append(Reject(line, "invalid_utf8", bad, preview(raw)))
                continue
            try:
                rec = json.loads(raw)
            except ValueError as exc:
                msg, col = getattr(exc, "msg", str(exc)), getattr(exc, "colno", None)
                rejects.append(Reject(line, "invalid_json", f"{msg} at column {col}", preview(raw)))
                continue
            try:
                sink.add(rec, line)
            except BadRecord as b_:
                rejects.append(Reject(line, b_.reason, b_.detail, preview(raw)))

    counts = [0, 0]  # content lines, blank lines

    def batches() -> Iterator[chunks.Batch]:
        block: _Block | None = first
        while block is not None:
            counts[0] += len(block.content)
            counts[1] += int(block.blank.sum())
            yield from block.batches()
            line = block.first_line + len(block.ends)
            more, _ = next(blocks, (b"", 0))
            block = _Block(more, line) if more else None

    chunks.read_batches(batches(), sink, per_line, split_invalid_utf8=True)
    return ReadResult("jsonl", fmt, sink.tables, rejects, counts[0], counts[1], notes, sink.formats)
