"""The one short-hash helper: every cache key, study name, fingerprint and spec hash is made here."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def short_hash(*parts: Any, length: int = 16) -> str:
    """Stable short hex digest of JSON-able parts (pydantic models are hashed through ``model_dump(mode="json")``)."""
    blob = json.dumps([_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _plain(part: Any) -> Any:
    dump = getattr(part, "model_dump", None)
    return dump(mode="json") if callable(dump) else part
