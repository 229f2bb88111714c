"""Feedback drop (spec ``serving.log_requests``): every served request and its answer appended as one JSONL line in
the pipeline's chat format (``{"messages": [...]}``), personal data and secrets masked with the spec's
``cleaning.pii`` kinds (whatever its mode: served traffic is never stored unmasked), into a review folder under the
state root, outside ``incoming_dir``. A reviewer edits or deletes lines, then moves the file into ``incoming_dir``:
it is then an ordinary drop (registered, cleaned, deduplicated, split like any other).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

from finetune_pipeline.spec import PiiSpec

Message = dict[str, str]


class RequestLog:
    """Appends served conversations to ``folder/<model>-v<version>-<UTC date>.jsonl`` (one file per model version
    and day; lines are written whole under a lock, so concurrent requests never interleave)."""

    def __init__(self, folder: Path, model: str, version: str, pii: PiiSpec):
        self.folder = Path(folder)
        self.model = model
        self.version = version
        self.kinds = list(pii.kinds)
        self.region = pii.phone_region
        self._lock = threading.Lock()

    def path(self, when: datetime | None = None) -> Path:
        day = (when or datetime.now(UTC)).strftime("%Y%m%d")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)
        return self.folder / f"{safe}-v{self.version}-{day}.jsonl"

    def scrub(self, text: str) -> str:
        from finetune_pipeline.data.pii import scrub

        return scrub(text, self.kinds, self.region) if self.kinds and text else text

    def append(self, conversation: list[Message], answer: str) -> Path:
        """One served exchange as a chat-format row: the request's messages and the model's answer, masked."""
        msgs = [*conversation, {"role": "assistant", "content": answer}]
        row = {"messages": [{"role": m["role"], "content": self.scrub(m["content"])} for m in msgs]}
        line = json.dumps(row, ensure_ascii=False) + "\n"
        p = self.path()
        with self._lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            with p.open("a", encoding="utf-8") as f:
                f.write(line)
        return p
