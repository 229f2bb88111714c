"""The record formats, in ONE table: each format's fields (ColumnMap attributes), which are required, the order in
which formats are detected (the table's order: most specific first), and how a record flattens into messages.

A new record format is one RecordFormat entry below plus its column names in ``spec.ColumnMap`` (and its name in
``SourceSpec.record_format``); the readers, the detection, the type checks and ``normalize.flatten`` read the table.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from finetune_pipeline.data.readers.result import FileProblem
from finetune_pipeline.data.readers.text import BadRecord, checked_utf8, scalar_str
from finetune_pipeline.spec import ColumnMap


@dataclass(frozen=True)
class RecordFormat:
    """Field names are ColumnMap attributes (the file's names come from ``source.columns``)."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    # a conversation: (list field, role key, content key); its optional ``system`` field becomes the first message
    messages: tuple[str, str, str] | None = None
    # otherwise the turns: (role, fields); several fields are joined by a blank line (those present and not blank)
    turns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    system: str | None = None  # optional field holding a system prompt (prepended when present and not empty)

    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional

    @property
    def dialogue(self) -> bool:
        """Records are conversations (a user turn, the answer last, roles in order are checked); else plain text."""
        return self.messages is not None or any(role == "user" for role, _ in self.turns)


RECORD_FORMATS: tuple[RecordFormat, ...] = (
    RecordFormat("chat", ("messages",), messages=("messages", "role", "content")),
    RecordFormat(
        "sharegpt",
        ("conversations",),
        ("system",),
        messages=("conversations", "sharegpt_role", "sharegpt_content"),
        system="system",
    ),
    RecordFormat(
        "alpaca",
        ("instruction", "output"),
        ("input", "system"),
        turns=(("user", ("instruction", "input")), ("assistant", ("output",))),
        system="system",
    ),
    RecordFormat(
        "prompt_completion",
        ("prompt", "completion"),
        ("system",),
        turns=(("user", ("prompt",)), ("assistant", ("completion",))),
        system="system",
    ),
    RecordFormat("text", ("text",), turns=(("assistant", ("text",)),)),
)
BY_NAME = {f.name: f for f in RECORD_FORMATS}


def record_format(fmt: str) -> RecordFormat:
    try:
        return BY_NAME[fmt]
    except KeyError:
        raise ValueError(f"unknown record format {fmt!r}: one of {', '.join(BY_NAME)}") from None


def plain_text(fmt: str) -> bool:
    """Whether rows of this record format (a name from a ReadResult: also 'mixed' or '') are plain text."""
    return fmt in BY_NAME and not BY_NAME[fmt].dialogue


def _msg_type(cols: ColumnMap, f: RecordFormat) -> pa.DataType:
    _, role, content = f.messages  # type: ignore[misc]
    return pa.list_(pa.struct([(getattr(cols, role), pa.string()), (getattr(cols, content), pa.string())]))


def format_fields(cols: ColumnMap, fmt: str) -> dict[str, pa.DataType]:
    """The fields a record format reads, with their Arrow types (required ones first)."""
    f = record_format(fmt)
    listed = f.messages[0] if f.messages else None
    return {getattr(cols, a): (_msg_type(cols, f) if a == listed else pa.string()) for a in f.fields()}


def required_fields(cols: ColumnMap, fmt: str) -> list[str]:
    return [getattr(cols, a) for a in record_format(fmt).required]


def extra_fields(cols: ColumnMap) -> list[str]:
    return [c for c in (cols.id, cols.label, cols.timestamp) if c]


def input_schema(cols: ColumnMap, fmt: str) -> pa.Schema:
    fields = dict(format_fields(cols, fmt))
    for c in extra_fields(cols):
        fields.setdefault(c, pa.string())
    return pa.schema(list(fields.items()) + [("_line", pa.int64())])


def formats_of(record: dict[str, Any], cols: ColumnMap, non_null: bool = False) -> list[str]:
    """Record formats whose required fields are all present (with ``non_null``: and not null) in this record
    (most specific first). Mixed files use ``non_null``: CSV and Parquet rows hold every column, null where unused."""
    out = []
    for f in RECORD_FORMATS:
        req = [getattr(cols, a) for a in f.required]
        if all(record.get(k) is not None for k in req) if non_null else all(k in record for k in req):
            out.append(f.name)
    return out


def _fields_listing() -> str:
    return ", ".join(f"{f.name} ({', '.join(f.required)})" for f in RECORD_FORMATS)


def detect_format(records: list[Any], cols: ColumnMap, where: str) -> tuple[str, str]:
    """Pick the record format from sample records; raise FileProblem (with a fix that works) when none clearly fits."""
    dicts = [r for r in records if isinstance(r, dict)]
    votes = Counter(f for r in dicts for f in formats_of(r, cols)[:1])
    if dicts and votes:
        fmt, n = votes.most_common(1)[0]
        if n >= 0.8 * len(dicts):
            fields = ", ".join(required_fields(cols, fmt))
            return fmt, f"detected record format '{fmt}' (fields {fields} in {n} of {len(dicts)} sampled records)"
        if len(votes) > 1 and sum(votes.values()) >= 0.8 * len(dicts):
            mix = ", ".join(f"{f} in {k}" for f, k in votes.most_common())
            raise FileProblem(
                "unknown_format",
                f"{where}: the records mix record formats ({mix} of {len(dicts)} sampled records): set "
                "source.record_format: mixed to read each record in the format its fields show",
            )
    if records and not dicts:
        raise FileProblem(
            "unknown_format",
            f"{where}: the records are not JSON objects (the first is a {type(records[0]).__name__}): each record "
            'must be an object such as {"messages": [{"role": "user", "content": "..."}, ...]}; for other shapes '
            "set source.record_hook to a 'module:function' that turns one record into its messages",
        )
    seen = Counter(k for r in dicts for k in r)
    top = ", ".join(f"{k} ({v})" for k, v in seen.most_common(8)) or "none"
    lists = [k for k, _ in seen.most_common() if any(isinstance(r.get(k), list) for r in dicts)]
    strings = [k for k, _ in seen.most_common() if any(isinstance(r.get(k), str) for r in dicts) and k != cols.id]
    if lists:
        example = f"record_format: chat, columns: {{messages: {lists[0]}}} (and role / content for the message keys)"
    elif len(strings) >= 2:
        example = f"record_format: prompt_completion, columns: {{prompt: {strings[0]}, completion: {strings[1]}}}"
    elif strings:
        example = f"record_format: text, columns: {{text: {strings[0]}}}"
    else:
        example = "record_format: chat, columns: {messages: YOUR_FIELD}"
    raise FileProblem(
        "unknown_format",
        f"{where}: no record format fits the first {len(records)} records (fields seen: {top}). Map your field "
        f"names onto one with source.record_format and source.columns, e.g. {example}; for nested or custom "
        "records set source.record_hook to a 'module:function' that returns a record's messages. Formats and "
        f"their fields: {_fields_listing()}.",
    )


def _text_parts(value: Any) -> str | None:
    """A message content given as a list of parts ({type: text, text: ...}) becomes their joined text."""
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    return None


def _messages(name: str, v: Any, role_k: str, content_k: str) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise BadRecord("messages_not_list", f"'{name}' must be a list of messages, got {type(v).__name__}")
    msgs = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or role_k not in m or content_k not in m:
            raise BadRecord("bad_message", f"message {i} must be an object with '{role_k}' and '{content_k}'")
        role, content = m[role_k], m[content_k]
        if not isinstance(role, str):
            raise BadRecord("bad_message", f"message {i} has a {type(role).__name__} as {role_k}, not a string")
        role = checked_utf8(role, f"message {i} {role_k}")
        if content is not None and not isinstance(content, str):
            joined = _text_parts(content)
            if joined is None:
                raise BadRecord(
                    "bad_message", f"message {i} ({role}) {content_k} must be a string, got {type(content).__name__}"
                )
            content = joined
        if content is not None:
            content = checked_utf8(content, f"message {i} ({role}) {content_k}")
        msgs.append({role_k: role, content_k: content})
    return msgs


def coerce_record(record: Any, cols: ColumnMap, fmt: str) -> dict[str, Any]:
    """Check a parsed record's types for the format and return it shaped like ``input_schema``;
    raise BadRecord(reason, detail) otherwise. Semantic checks (roles, order, lengths) come later, column-wise."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in required_fields(cols, fmt) if k not in record]
    if missing:
        others = [f for f in formats_of(record, cols) if f != fmt]
        if others:
            raise BadRecord(
                "mixed_format",
                f"this record looks like '{others[0]}' but the file is '{fmt}' (fields: {', '.join(sorted(record)[:8])}); "
                "put records of one format per file",
            )
        raise BadRecord(
            "missing_field",
            f"field '{missing[0]}' is missing (fields present: {', '.join(sorted(record)[:8]) or 'none'}); "
            "map your field names with source.columns",
        )
    nulls = [k for k in required_fields(cols, fmt) if record[k] is None]
    if nulls:
        raise BadRecord("null_field", f"field '{nulls[0]}' is null")
    out: dict[str, Any] = {}
    for name, typ in format_fields(cols, fmt).items():
        v = record.get(name)
        if pa.types.is_list(typ):
            role_k, content_k = typ.value_type.field(0).name, typ.value_type.field(1).name
            out[name] = None if v is None else _messages(name, v, role_k, content_k)
        else:
            if v is not None and not isinstance(v, str):
                if isinstance(v, bool | int | float):
                    v = json.dumps(v)
                else:
                    raise BadRecord("bad_field", f"field '{name}' must be a string, got {type(v).__name__}")
            out[name] = checked_utf8(v, f"field '{name}'") if v is not None else None
    for c in extra_fields(cols):
        out[c] = scalar_str(record.get(c), f"field '{c}'")
    return out
