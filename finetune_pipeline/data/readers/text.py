"""Text-level rules shared by every reader: UTF-8 checks, previews of raw input, JSON values from bytes.

A record whose text cannot be stored as UTF-8 is a bad record (BadRecord invalid_utf8), never a crash: bytes that
are not UTF-8 are decoded with ``surrogateescape`` (U+DC80..U+DCFF) and named in the record's reject detail.
"""

from __future__ import annotations

import json
from typing import Any

RAW_PREVIEW_CHARS = 2000


class BadRecord(ValueError):
    """One record does not fit: a machine-readable reason and a detail naming the fix."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def checked_utf8(s: str, what: str) -> str:
    """``s`` unchanged when it can be stored as UTF-8; else BadRecord invalid_utf8 naming the offending character.
    Bytes that were not UTF-8 in the file arrive as U+DC80..U+DCFF (surrogateescape); a JSON escape of half a
    surrogate pair (\\ud83d alone) arrives as a lone surrogate."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError as exc:
        ch = s[exc.start]
        if "\udc80" <= ch <= "\udcff":
            raise BadRecord(
                "invalid_utf8",
                f"{what} holds the byte 0x{ord(ch) - 0xDC00:02x} at character {exc.start}, which is not UTF-8: "
                "re-export the file as UTF-8",
            ) from None
        raise BadRecord(
            "invalid_utf8",
            f"{what} holds a lone surrogate escape \\u{ord(ch):04x} at character {exc.start} (half of an emoji or "
            "symbol cut in two): fix or remove this record",
        ) from None


def safe_text(s: str) -> str:
    """``s`` with characters that cannot be stored as UTF-8 replaced by U+FFFD (for previews and details)."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in s)


def scalar_str(v: Any, what: str = "a field") -> str | None:
    """An id, label or timestamp value as text: strings as they are, numbers and others as JSON."""
    if v is None:
        return None
    if isinstance(v, str):
        return checked_utf8(v, what)
    if isinstance(v, bool | int | float):
        return json.dumps(v)
    return checked_utf8(json.dumps(v, ensure_ascii=False, sort_keys=True), what)


def preview(raw: bytes | str) -> str:
    """The start of a raw record for the quarantine's ``raw`` column."""
    if isinstance(raw, bytes):
        return raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:RAW_PREVIEW_CHARS]
    return safe_text(raw[:RAW_PREVIEW_CHARS])


def decode_error(raw: bytes) -> str | None:
    """None when ``raw`` is UTF-8; else where it is not, with the fix."""
    try:
        raw.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        return f"byte {exc.start} (0x{raw[exc.start]:02x}) is not UTF-8: re-export the file as UTF-8"


def is_utf8(b: bytes) -> bool:
    if b.isascii():
        return True
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def load_json(raw: bytes) -> Any:
    """One JSON value from bytes; bytes that are not UTF-8 become U+DC80..U+DCFF (then invalid_utf8 rows)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        return json.loads(raw.decode("utf-8", errors="surrogateescape"))
