"""What every reader returns (ReadResult: Arrow tables of one record format, rejects with their line), the
whole-file failure (FileProblem), and the reader interface the dispatcher calls."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa

from finetune_pipeline.spec import SourceSpec


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


@dataclass
class Dropped:
    """The file a reader reads: its path, the name the user dropped (for messages), and its bytes when the
    dispatcher had to transcode them (UTF-16); readers that stream open it, the others read it whole."""

    path: Path
    where: str
    data: bytes | None = None
    skip: int = 0  # bytes to skip at the start (a UTF-8 byte-order mark)

    def read_bytes(self) -> bytes:
        if self.data is None:
            self.data = self.path.read_bytes()[self.skip :]
            self.skip = 0
        return self.data

    def open(self) -> BinaryIO:
        return self.open_at(0)

    def open_at(self, offset: int) -> BinaryIO:
        """The text from byte ``offset`` on (after a byte-order mark)."""
        f: BinaryIO = io.BytesIO(self.data) if self.data is not None else self.path.open("rb")
        f.seek(offset + (self.skip if self.data is None else 0))
        return f


class Reader(Protocol):
    """One file format: reads a dropped file into a ReadResult; raises FileProblem only for the whole file."""

    def __call__(self, dropped: Dropped, source: SourceSpec) -> ReadResult: ...
