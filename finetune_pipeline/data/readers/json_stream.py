"""A JSON document scanned block by block, so that memory holds a block and the record being read, not the file.

Why not a streaming parser library (ijson, with its yajl C backend, was tried): it yields values and events but
not where they are in the file, and every record must keep its byte span (its bytes go through Arrow's JSON
reader) and its source line (the quarantine names it). So the bytes are read in blocks as Latin-1 text (one
character per byte: positions are byte offsets) and the stdlib's C scanner (``json.JSONDecoder.raw_decode``) parses
one value at a time; a value cut by the end of a block is parsed again once the next block is in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from finetune_pipeline.data.readers.result import Reject
from finetune_pipeline.data.readers.text import RAW_PREVIEW_CHARS, preview

BLOCK = 8 << 20
RECORD_LIMIT = 512 << 20  # a value still unfinished after this many bytes is malformed, not cut by a block
_WS = re.compile(r"[ \t\r\n\ufeff]*")
_PREVIEW = RAW_PREVIEW_CHARS * 4


class Malformed(Exception):
    """The document is cut off or malformed at ``pos`` (the whole-document reader says how)."""

    def __init__(self, pos: int):
        super().__init__(pos)
        self.pos = pos


class Stream:
    """The document from byte ``base`` on; positions are offsets into ``text`` (the buffered part)."""

    def __init__(self, f: BinaryIO, base: int = 0, line: int = 1):
        self.f, self.base, self.line = f, base, line
        self.text, self.lpos, self.eof = "", 0, False
        self.after = -1  # where the last array or object read ended (-1: it did not end)
        self.dec = json.JSONDecoder()

    def more(self) -> bool:
        if self.eof:
            return False
        b = self.f.read(BLOCK)
        if not b:
            self.eof = True
            return False
        self.text += b.decode("latin-1")
        return True

    def fill(self, end: int) -> None:
        while len(self.text) < end and self.more():
            pass

    def trim(self, pos: int) -> int:
        """Forget the text before ``pos`` once it is long; returns ``pos`` in the new coordinates."""
        if pos < BLOCK:
            return pos
        self.at(pos)
        self.text, self.base, self.lpos = self.text[pos:], self.base + pos, 0
        return 0

    def at(self, pos: int) -> int:
        """1-based line of ``pos``."""
        if pos >= self.lpos:
            self.line += self.text.count("\n", self.lpos, pos)
        else:
            self.line -= self.text.count("\n", pos, self.lpos)
        self.lpos = pos
        return self.line

    def ws(self, pos: int) -> int:
        while True:
            pos = _WS.match(self.text, pos).end()  # type: ignore[union-attr]
            if pos < len(self.text) or not self.more():
                return pos

    def char(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""

    def value(self, pos: int) -> tuple[Any, int]:
        """The JSON value at ``pos`` and where it ends; ValueError when it is malformed or the file ends in it."""
        while True:
            try:
                obj, end = self.dec.raw_decode(self.text, pos)
                if end < len(self.text) or self.eof:
                    return obj, end
            except json.JSONDecodeError as exc:  # cut by the block's end, or malformed inside it
                inside = exc.pos < len(self.text) - 16 and not exc.msg.startswith("Unterminated string")
                if self.eof or inside or len(self.text) - pos > RECORD_LIMIT:
                    raise
            if not self.more():  # a number at the very end of the file: parse once more, now at the end
                continue

    def raw(self, a: int, b: int) -> bytes:
        return self.text[a:b].encode("latin-1")

    def preview_at(self, pos: int) -> str:
        self.fill(pos + _PREVIEW)
        return preview(self.raw(pos, pos + _PREVIEW))


def elements(s: Stream, pos: int, rejects: list[Reject], notes: list[str]) -> Iterator[tuple[bytes, int, Any]]:
    """The array opening at ``pos``: (bytes, line, parsed value) of each element. A cut-off or malformed array
    keeps the elements before the fault (a truncated_json reject, or a note when the file just ends);
    ``s.after`` is the position after its ']' or -1."""
    s.after = -1
    count = 0
    pos = s.ws(pos + 1)
    if s.char(pos) == "]":
        s.after = pos + 1
        return
    while pos < len(s.text):
        pos = s.trim(pos)
        try:
            obj, end = s.value(pos)
        except ValueError as exc:
            line = s.at(pos)
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"the JSON array is cut off or malformed at line {line} ({getattr(exc, 'msg', exc)}) after "
                    f"{count} complete records; the records before it are kept. Re-export the file in full.",
                    s.preview_at(pos),
                )
            )
            notes.append(f"array cut at line {line} after {count} complete records")
            return
        yield s.raw(pos, end), s.at(pos), obj
        count += 1
        pos = s.ws(end)
        c = s.char(pos)
        if c == ",":
            pos = s.ws(pos + 1)
        elif c == "]":
            s.after = pos + 1
            return
        elif not c:
            notes.append(f"array not closed after {count} records (the file ends there; all were kept)")
            return
        else:
            line = s.at(pos)
            rejects.append(
                Reject(
                    line,
                    "truncated_json",
                    f"expected ',' or ']' at line {line} after {count} records; "
                    "the rest of the file is not read. Fix the file and drop it again.",
                    s.preview_at(pos),
                )
            )
            return


def members(s: Stream, pos: int, skip_lists: bool) -> Iterator[tuple[str, int, int, int, Any]]:
    """The object opening at ``pos``: (key, value start, value end, line, parsed value) of each member; with
    ``skip_lists`` a list value is stepped over element by element (never held whole) and given as ``...``.
    Raises Malformed when the object is cut off or malformed; ``s.after`` is the position after its '}'."""
    s.after = -1
    pos = s.ws(pos + 1)
    if s.char(pos) == "}":
        s.after = pos + 1
        return
    while True:
        pos = s.trim(pos)
        if s.char(pos) != '"':
            raise Malformed(pos)
        try:
            _, end = s.value(pos)
            key = json.loads(s.raw(pos, end))
        except ValueError:
            raise Malformed(pos) from None
        pos = s.ws(end)
        if s.char(pos) != ":":
            raise Malformed(pos)
        pos = s.ws(pos + 1)
        line = s.at(pos)
        if skip_lists and s.char(pos) == "[":
            start = s.base + pos
            for _ in elements(s, pos, [], []):
                pass
            if s.after < 0:
                raise Malformed(len(s.text))
            end = s.after
            yield key, start, s.base + end, line, ...
        else:
            try:
                obj, end = s.value(pos)
            except ValueError:
                raise Malformed(pos) from None
            yield key, s.base + pos, s.base + end, line, obj
        pos = s.ws(end)
        c = s.char(pos)
        if c == ",":
            pos = s.ws(pos + 1)
        elif c == "}":
            s.after = pos + 1
            return
        else:
            raise Malformed(pos)
