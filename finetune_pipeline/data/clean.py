"""Parse a dropped file, normalise every row to one chat schema, validate, dedup exactly, quarantine the rest.

Nothing is lost: every non-blank line ends up kept, quarantined (with a machine-readable reason and its
source line) or deduplicated (with the row it duplicated), so ``rows_in = kept + quarantined + deduplicated``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_pipeline.spec import CleaningSpec, SourceSpec

ROLES = ("system", "user", "assistant")
RAW_PREVIEW_CHARS = 2000
_SPACES = re.compile(r"[ \t]+")

KEPT_COLUMNS = ["row_id", "messages", "content_hash", "prompt_hash", "drop", "source_line"]
QUARANTINE_COLUMNS = ["drop", "source_line", "reason", "detail", "raw"]
DUPLICATE_COLUMNS = ["drop", "source_line", "row_id", "duplicate_of", "content_hash"]


class RowRejected(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class CleanResult:
    kept: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates: pd.DataFrame
    rows_in: int
    blank_lines: int
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def rejection_rate(self) -> float:
        return len(self.quarantine) / self.rows_in if self.rows_in else 0.0

    def accounted(self) -> bool:
        return self.rows_in == len(self.kept) + len(self.quarantine) + len(self.duplicates)


def _normalise_text(text: str, collapse: bool) -> str:
    if not collapse:
        return text
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines).strip()


def normalise_messages(record: Any, source: SourceSpec, cleaning: CleaningSpec) -> list[dict[str, str]]:
    """Return the record's messages as [{role, content}], or raise RowRejected with the reason."""
    if not isinstance(record, dict):
        raise RowRejected("not_an_object", f"expected a JSON object, got {type(record).__name__}")
    if source.messages_field not in record:
        raise RowRejected(
            "missing_field", f"field '{source.messages_field}' is missing (set source.messages_field in the spec)"
        )
    raw_msgs = record[source.messages_field]
    if not isinstance(raw_msgs, list) or not raw_msgs:
        raise RowRejected("messages_not_list", f"'{source.messages_field}' must be a non-empty list of messages")
    msgs: list[dict[str, str]] = []
    for i, m in enumerate(raw_msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RowRejected("bad_message", f"message {i} must be an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise RowRejected("unknown_role", f"message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        if content is None:
            raise RowRejected("null_content", f"message {i} ({role}) has null content")
        if not isinstance(content, str):
            raise RowRejected("bad_message", f"message {i} ({role}) content must be a string")
        msgs.append({"role": role, "content": _normalise_text(content, cleaning.normalize_whitespace)})
    if msgs[-1]["role"] != "assistant":
        raise RowRejected("no_final_assistant", "the last message must be the assistant's answer to learn from")
    if not any(m["role"] == "user" for m in msgs):
        raise RowRejected("no_user_turn", "the conversation has no user message")
    if len(msgs[-1]["content"]) < max(cleaning.min_assistant_chars, 1):
        reason = "empty_assistant" if not msgs[-1]["content"] else "assistant_too_short"
        raise RowRejected(reason, f"the final assistant answer has {len(msgs[-1]['content'])} characters")
    total = sum(len(m["content"]) for m in msgs)
    if total > cleaning.max_total_chars:
        raise RowRejected("too_long", f"{total} characters > cleaning.max_total_chars={cleaning.max_total_chars}")
    return msgs


def content_hash(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def clean_file(path: Path, drop: str, source: SourceSpec, cleaning: CleaningSpec) -> CleanResult:
    """Parse and clean one JSONL drop file. Never raises for bad rows; each goes to the quarantine."""
    kept: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    rows_in = blank = 0
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line does not start another one
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            blank += 1
            continue
        rows_in += 1
        preview = raw[:RAW_PREVIEW_CHARS].decode("utf-8", errors="replace")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            quarantine.append(_q(drop, lineno, "invalid_utf8", f"byte {exc.start} is not UTF-8", preview))
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            quarantine.append(_q(drop, lineno, "invalid_json", f"{exc.msg} at column {exc.colno}", preview))
            continue
        try:
            msgs = normalise_messages(record, source, cleaning)
        except RowRejected as rej:
            quarantine.append(_q(drop, lineno, rej.reason, rej.detail, preview))
            continue
        chash = content_hash(msgs)
        given_id = record.get(source.id_field) if source.id_field else None
        row_id = str(given_id) if given_id not in (None, "") else chash[:16]
        if chash in seen:
            duplicates.append(
                {
                    "drop": drop,
                    "source_line": lineno,
                    "row_id": row_id,
                    "duplicate_of": seen[chash],
                    "content_hash": chash,
                }
            )
            continue
        seen[chash] = row_id
        kept.append(
            {
                "row_id": row_id,
                "messages": json.dumps(msgs, ensure_ascii=False),
                "content_hash": chash,
                "prompt_hash": content_hash(msgs[:-1]),
                "drop": drop,
                "source_line": lineno,
            }
        )
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    return CleanResult(
        kept=pd.DataFrame(kept, columns=KEPT_COLUMNS),
        quarantine=pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS),
        duplicates=pd.DataFrame(duplicates, columns=DUPLICATE_COLUMNS),
        rows_in=rows_in,
        blank_lines=blank,
        reasons=dict(sorted(reasons.items())),
    )


def _q(drop: str, line: int, reason: str, detail: str, raw: str) -> dict[str, Any]:
    return {"drop": drop, "source_line": line, "reason": reason, "detail": detail, "raw": raw}


def schema_problems(kept: pd.DataFrame) -> list[str]:
    """Invariants of a cleaned drop: each row parses, has a user turn, ends with a non-empty assistant
    answer, and row ids are unique. Empty list = fine."""
    problems = []
    for row_id, m in zip(kept["row_id"], kept["messages"], strict=True):
        msgs = json.loads(m)
        if not any(x["role"] == "user" for x in msgs) or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
            problems.append(f"row {row_id}: not a chat ending with a non-empty assistant answer")
    dup_ids = kept["row_id"][kept["row_id"].duplicated()].tolist()
    if dup_ids:
        problems.append(f"row ids used twice with different content: {dup_ids[:5]}")
    return problems


def write_parquet_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write next to the target and rename, so a concurrent reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)


def frame_digest(df: pd.DataFrame, columns: list[str]) -> str:
    """Order-independent digest of a frame's content (used as Dagster data version and MLflow dataset digest)."""
    if df.empty:
        return hashlib.sha256(b"empty").hexdigest()[:16]
    rows = sorted(json.dumps([str(v) for v in r], ensure_ascii=False) for r in df[columns].itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]
