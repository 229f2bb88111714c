"""Read a dropped file (JSONL, JSON, CSV, Parquet) into Arrow tables of one record format, never raising for bad rows.

One module per file format (jsonl, json_document, csv_rows, parquet_rows), each a ``Reader``; ``dispatch`` picks
the reader and alone decides fallbacks (JSON vs JSON Lines, binary files); ``chunks`` is the loop they share (a
batch through Arrow's JSON reader, what it declines record by record); ``record_formats`` is the one table of
record formats. Every table carries ``_line``: the 1-based source line of the record (for Parquet: the row number).
"""

from finetune_pipeline.data.readers.dispatch import EXTENSIONS, file_format_of, read_file
from finetune_pipeline.data.readers.record_formats import RECORD_FORMATS, detect_format, formats_of
from finetune_pipeline.data.readers.result import FileProblem, ReadResult, Reject
from finetune_pipeline.data.readers.text import RAW_PREVIEW_CHARS, safe_text

__all__ = [
    "EXTENSIONS",
    "RAW_PREVIEW_CHARS",
    "RECORD_FORMATS",
    "FileProblem",
    "ReadResult",
    "Reject",
    "detect_format",
    "file_format_of",
    "formats_of",
    "read_file",
    "safe_text",
]
