"""Where clean_file puts the rows it keeps while a drop streams through it: in memory (the CleanResult holds them),
or in a Parquet file written chunk by chunk, so that a large drop's text is never held at once.

Rows arrive after the row checks and the exact dedup, chunk by chunk; near duplicates are only known at the end,
so ``finish`` gets the final mask over every row added. The prompt and final-answer texts (the near dedup's two
sides) are kept alongside, for the exact verification of the candidate pairs (``texts``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

KEPT_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("messages", pa.string()),
        ("content_hash", pa.string()),
        ("drop", pa.string()),
        ("source", pa.string()),
        ("source_line", pa.int64()),
        ("label", pa.string()),
        ("timestamp", pa.string()),
        ("n_messages", pa.int64()),
        ("chars", pa.int64()),
        ("quality", pa.float64()),
        ("tokens", pa.int64()),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        ("drop", pa.string()),
        ("source_line", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)
_TEXT_SCHEMA = pa.schema([("_prompt", pa.large_string()), ("_final", pa.large_string())])


class _Spill:
    """A hidden Parquet file next to ``target``, written a table at a time and read back a row group at a time."""

    def __init__(self, target: Path):
        self.path = target.with_name(f".{target.name}.spill")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)

    def groups(self, columns: list[str]) -> Iterator[pa.Table]:
        self.close()
        if self.path.exists():
            yield from row_groups(self.path, columns)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class MemoryStore:
    """Kept rows in memory: the whole drop's rows end up in the CleanResult."""

    path: Path | None = None

    def __init__(self) -> None:
        self.frames: list[pd.DataFrame] = []
        self.prompts: list[pa.Array] = []
        self.finals: list[pa.Array] = []

    def add(self, frame: pd.DataFrame, prompt: pa.Array, final: pa.Array) -> None:
        self.frames.append(frame)
        self.prompts.append(prompt)
        self.finals.append(final)

    def texts(self, rows: np.ndarray) -> tuple[pa.Array, pa.Array]:
        pick = pa.array(rows)
        return (
            pa.concat_arrays([a.cast(pa.large_string()) for a in self.prompts]).take(pick),
            pa.concat_arrays([a.cast(pa.large_string()) for a in self.finals]).take(pick),
        )

    def finish(self, alive: np.ndarray, columns: list[str], text_only: bool) -> tuple[pd.DataFrame, list[str] | None]:
        """The kept rows (every column); their chat-schema problems are left to the caller (None)."""
        self.prompts = self.finals = []
        kept = pd.concat(self.frames, ignore_index=True) if self.frames else _empty(columns)
        self.frames = []
        if not alive.all():
            kept = kept[alive]
        return kept.reset_index(drop=True), None

    def discard(self) -> None:
        self.frames, self.prompts, self.finals = [], [], []


class ParquetStore:
    """Kept rows spilled to Parquet chunk by chunk (next to ``path``), then copied to ``path`` without the near
    duplicates. The CleanResult then holds the kept rows without their messages (a few fields per row), and the
    chat-schema problems are found batch by batch while the final file is written."""

    def __init__(self, path: Path):
        self.path = path
        self.spill = _Spill(path)

    def add(self, frame: pd.DataFrame, prompt: pa.Array, final: pa.Array) -> None:
        if not len(frame):
            return
        t = pa.Table.from_pandas(frame[KEPT_SCHEMA.names], schema=KEPT_SCHEMA, preserve_index=False)
        t = t.append_column("_prompt", prompt.cast(pa.large_string())).append_column(
            "_final", final.cast(pa.large_string())
        )
        self.spill.write(t)

    def texts(self, rows: np.ndarray) -> tuple[pa.Array, pa.Array]:
        """The two sides of the given rows (sorted positions), read back from the spill."""
        parts, start = [], 0
        for b in self.spill.groups(_TEXT_SCHEMA.names):
            end = start + b.num_rows
            lo, hi = np.searchsorted(rows, [start, end])
            if hi > lo:
                parts.append(b.take(pa.array(rows[lo:hi] - start)))
            start = end
        if not parts:
            return pa.array([], pa.large_string()), pa.array([], pa.large_string())
        t = pa.concat_tables(parts)
        return t.column("_prompt").combine_chunks(), t.column("_final").combine_chunks()

    def finish(self, alive: np.ndarray, columns: list[str], text_only: bool) -> tuple[pd.DataFrame, list[str] | None]:
        """Write the kept rows to ``path`` (atomically); return them without ``messages``, and the chat-schema
        problems of their messages (``row_problems``)."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        writer = pq.ParquetWriter(tmp, KEPT_SCHEMA)
        small, problems, start = [], [], 0
        for b in self.spill.groups(KEPT_SCHEMA.names):
            keep = alive[start : start + b.num_rows]
            start += b.num_rows
            t = b.filter(pa.array(keep))
            writer.write_table(t)
            problems += row_problems(t.column("row_id").to_pylist(), t.column("messages").to_pylist(), text_only)
            small.append(t.drop_columns(["messages"]).to_pandas())
        writer.close()
        tmp.replace(self.path)
        self.spill.discard()
        kept = pd.concat(small, ignore_index=True) if small else _empty([c for c in columns if c != "messages"])
        for c in ("label", "timestamp", "tokens"):
            kept[c] = kept[c].astype(object).where(kept[c].notna(), None)
        return kept, problems

    def discard(self) -> None:
        self.spill.discard()


class MemoryQuarantine:
    """The quarantine in memory: every rejected row in the CleanResult."""

    path: Path | None = None

    def __init__(self) -> None:
        self.frames: list[pd.DataFrame] = []

    def add(self, frame: pd.DataFrame) -> None:
        self.frames.append(frame)

    def finish(self, first: pd.DataFrame) -> tuple[pd.DataFrame, int]:
        """All rows in line order (``first``, the reader's rejects, before a batch's at the same line)."""
        q = pd.concat([first, *self.frames], ignore_index=True) if self.frames else first
        self.frames = []
        return q.sort_values("source_line", kind="stable").reset_index(drop=True), len(q)

    def discard(self) -> None:
        self.frames = []


class ParquetQuarantine:
    """The quarantine written to ``path`` batch by batch (each batch's rows sorted by line; batches come in file
    order), then merged with the reader's rejects in line order; the CleanResult holds its first ``preview_rows``."""

    def __init__(self, path: Path, preview_rows: int):
        self.path, self.preview_rows = path, preview_rows
        self.spill = _Spill(path)
        self.last_line = -1
        self.ordered = True  # every batch's lines after the previous batch's

    def add(self, frame: pd.DataFrame) -> None:
        if not len(frame):
            return
        lines = frame["source_line"].to_numpy()
        self.ordered &= bool(lines[0] >= self.last_line)
        self.last_line = int(lines[-1])
        self.spill.write(pa.Table.from_pandas(frame, schema=QUARANTINE_SCHEMA, preserve_index=False))

    def finish(self, first: pd.DataFrame) -> tuple[pd.DataFrame, int]:
        groups: Iterator[pd.DataFrame] = (g.to_pandas() for g in self.spill.groups(QUARANTINE_SCHEMA.names))
        if not self.ordered:  # a batch out of line order (rare): sort all of it at once
            groups = iter([pd.concat(list(groups), ignore_index=True).sort_values("source_line", kind="stable")])
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        writer = pq.ParquetWriter(tmp, QUARANTINE_SCHEMA)
        head, total, pending = [], 0, first
        for g in itertools.chain(groups, [None]):  # one row group in memory at a time
            if g is None:
                part, pending = pending, pending.iloc[:0]
            else:
                hi = g["source_line"].iloc[-1] if len(g) else -1
                take = (pending["source_line"] <= hi).to_numpy()
                part = pd.concat([pending[take], g], ignore_index=True).sort_values("source_line", kind="stable")
                pending = pending[~take]
            if not len(part):
                continue
            writer.write_table(pa.Table.from_pandas(part, schema=QUARANTINE_SCHEMA, preserve_index=False))
            if total < self.preview_rows:
                head.append(part.head(self.preview_rows - total))
            total += len(part)
        writer.close()
        tmp.replace(self.path)
        self.spill.discard()
        preview = pd.concat(head, ignore_index=True) if head else first.iloc[:0]
        return preview.reset_index(drop=True), total

    def discard(self) -> None:
        self.spill.discard()


def row_groups(path: Path, columns: list[str]) -> Iterator[pa.Table]:
    """A Parquet file's row groups one at a time (``iter_batches`` reads ahead: its memory grows with the file)."""
    f = pq.ParquetFile(path, pre_buffer=False)
    for i in range(f.num_row_groups):
        yield f.read_row_group(i, columns=columns, use_threads=False)


def read_rows(path: Path, positions: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """The rows at the given positions (any order) of a Parquet file, read batch by batch, in position order."""
    want = np.sort(np.asarray(positions, np.int64))
    parts, start = [], 0
    for b in row_groups(path, columns):
        end = start + b.num_rows
        lo, hi = np.searchsorted(want, [start, end])
        if hi > lo:
            parts.append(b.take(pa.array(want[lo:hi] - start)).to_pandas())
        start = end
    return pd.concat(parts, ignore_index=True) if parts else _empty(columns)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})


def row_problems(row_ids: list, messages: list[str], text_only: bool = False) -> list[str]:
    """Rows that do not parse as a chat ending with a non-empty assistant answer (or lack a user turn, except
    plain text)."""
    problems = []
    for row_id, m in zip(row_ids, messages, strict=True):
        msgs = json.loads(m)
        has_user = text_only or any(x["role"] == "user" for x in msgs)
        if not has_user or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
            problems.append(f"row {row_id}: not a chat ending with a non-empty assistant answer")
    return problems
