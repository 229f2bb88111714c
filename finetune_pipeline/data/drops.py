"""Dropped data files: content-hash partition keys and the "is this file finished?" rule the sensor applies.

A file is finished when all of these hold (``scan_incoming``):

- it is unchanged (size, mtime, inode) between two scans and older than ``settle_seconds``;
- no process holds it open for writing (Linux: /proc/*/fd and fdinfo flags; best effort: only processes this
  user may inspect are seen, and nothing is checked where /proc is absent);
- with a ``done_marker``: the producer's marker exists (``{name}.done`` next to the file, or a folder marker such
  as ``_SUCCESS`` newer than the file);
- without a marker, its content looks complete: a JSONL/NDJSON file ends with a newline, a JSON document parses
  to its end, a Parquet file ends with its footer magic. A file that does not is waited for until it has been
  unchanged for ``incomplete_grace_seconds``; then it is ingested and the reader quarantines its cut tail.

Size/mtime stability alone cannot tell a writer's pause from the end of the file; the last three rules can.
A 0-byte file is not waited for forever: once settled it is ingested and stops with empty_file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp")


@dataclass(frozen=True)
class Drop:
    key: str  # partition key: content hash prefix, so the same bytes twice are one partition
    path: Path
    size: int


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def drop_key(path: Path) -> str:
    """Partition key of a data file: the first 16 hex digits of its sha256."""
    return file_digest(path)[:16]


def is_marker(name: str, done_marker: str | None) -> bool:
    """Whether a file name is a completion marker (never a data file)."""
    if not done_marker:
        return False
    if "{name}" not in done_marker:
        return name == done_marker
    pattern = re.escape(done_marker).replace(re.escape("{name}"), ".+")
    return re.fullmatch(pattern, name) is not None


def candidate_files(incoming: Path, glob: str, done_marker: str | None = None) -> list[Path]:
    """Data files in the incoming folder, excluding hidden and in-progress names and markers, oldest first."""
    if not incoming.is_dir():
        return []
    found = []
    for p in incoming.glob(glob):
        if p.name.startswith((".", "~")) or p.name.endswith(IGNORED_SUFFIXES) or is_marker(p.name, done_marker):
            continue
        try:
            st = p.stat()
        except FileNotFoundError:  # removed or renamed while we looked
            continue
        if p.is_file():
            found.append((st.st_mtime_ns, p.name, p))
    return [p for _, _, p in sorted(found)]


@dataclass(frozen=True)
class ScanResult:
    ready: list[Drop]  # settled files with new content, one per distinct content
    seen: dict[str, list]  # path -> [size, mtime_ns, inode, key or None]: the sensor's cursor for the next scan
    waiting: list[str]  # files still being written or settling
    unchanged_skipped: int  # settled files whose content is already a known partition
    why: dict[str, str] = field(default_factory=dict)  # waiting file -> why it is not ingested yet

    def waiting_summary(self, limit: int = 5) -> str:
        items = [f"{Path(p).name} ({self.why.get(p, 'settling')})" for p in self.waiting[:limit]]
        more = f", +{len(self.waiting) - limit} more" if len(self.waiting) > limit else ""
        return "; ".join(items) + more


def _signature(p: Path) -> list[int]:
    """What must stay the same between two looks for a file to count as finished: size, mtime and inode
    (a file swapped in by rename with the same size and mtime still differs by inode)."""
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def open_for_writing(paths: list[Path]) -> dict[str, int]:
    """Which of ``paths`` some process holds open for writing: resolved path -> pid. Linux only (reads
    /proc/PID/fd links and the flags in /proc/PID/fdinfo); best effort: processes this user may not inspect
    are not seen, and where /proc is absent nothing is found."""
    targets = {os.path.realpath(p) for p in paths}
    out: dict[str, int] = {}
    proc = Path("/proc")
    if not targets or not (proc / "self" / "fd").is_dir():
        return out
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        fd_dir = proc / pid / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target not in targets:
                continue
            try:
                m = re.search(r"flags:\s*([0-7]+)", (proc / pid / "fdinfo" / fd).read_text())
                flags = int(m.group(1), 8) if m else os.O_WRONLY
            except OSError:
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                out[target] = int(pid)
    return out


def incomplete_reason(path: Path) -> str | None:
    """Why a file's content looks unfinished (None when it looks complete), by its extension."""
    suffix = path.suffix.lower()
    size = path.stat().st_size
    if size == 0 or suffix not in (".jsonl", ".ndjson", ".json", ".parquet", ".pq"):
        return None
    with path.open("rb") as f:
        f.seek(max(0, size - 4096))
        tail = f.read()
    if suffix in (".jsonl", ".ndjson"):
        return None if tail.endswith(b"\n") else "the last line has no newline yet"
    if suffix in (".parquet", ".pq"):
        return None if tail.endswith(b"PAR1") else "no Parquet footer yet"
    if tail.rstrip()[-1:] not in (b"]", b"}"):
        return "the JSON document is not closed yet"
    try:
        json.loads(path.read_bytes())
    except UnicodeDecodeError:
        return None  # complete but not UTF-8: the reader quarantines it
    except ValueError as exc:
        return f"the JSON document does not parse to its end ({getattr(exc, 'msg', exc)})"
    return None


def _marker_missing(p: Path, done_marker: str, mtime_ns: int) -> str | None:
    if "{name}" in done_marker:
        m = p.parent / done_marker.replace("{name}", p.name)
        return None if m.exists() else f"waiting for its marker {m.name}"
    m = p.parent / done_marker
    try:
        if m.stat().st_mtime_ns >= mtime_ns:
            return None
        return f"the marker {m.name} is older than the file"
    except FileNotFoundError:
        return f"waiting for the marker {m.name}"


def scan_incoming(
    incoming: Path,
    glob: str,
    settle_seconds: float,
    previous: dict[str, list] | None,
    known_keys: set[str],
    now: float | None = None,
    *,
    done_marker: str | None = None,
    incomplete_grace_seconds: float = 600.0,
    wait_for_writers: bool = True,
) -> ScanResult:
    """Find files that are finished being written and not yet ingested (the rules are in the module doc).

    A file is ready when its size, mtime and inode equal those of the previous scan (``previous``, the
    last result's ``seen``) and it has not been modified for ``settle_seconds``; with ``previous=None``
    only the age rule applies. It must also not be open for writing (``wait_for_writers``), have its marker
    (``done_marker``), and look complete (or be unchanged for ``incomplete_grace_seconds``). Files whose
    content hash is in ``known_keys`` are skipped, so a file seen twice, or copied under another name, never
    gives a second partition. Hashes of unchanged files are remembered in ``seen`` and not recomputed.
    """
    now = time.time() if now is None else now
    ready: dict[str, Drop] = {}
    seen: dict[str, list] = {}
    waiting: list[str] = []
    why: dict[str, str] = {}
    skipped = 0
    writers: dict[str, int] | None = None
    files = candidate_files(incoming, glob, done_marker)
    for p in files:
        try:
            sig = _signature(p)
            before = (previous or {}).get(str(p))
            stable = previous is None or (before is not None and before[:3] == sig)
            age = now - sig[1] / 1e9
            reason = None
            judged = stable and before is not None and len(before) > 3 and bool(before[3])  # found finished before
            if not (stable and age >= settle_seconds):
                reason = "settling: changed since the last look" if not stable else "settling"
            if reason is None and judged:
                pass
            elif reason is None and wait_for_writers:
                if writers is None:
                    writers = open_for_writing(files)
                pid = writers.get(os.path.realpath(p))
                if pid is not None:
                    reason = f"open for writing by process {pid}"
            if reason is None and judged:
                pass
            elif reason is None and done_marker:
                reason = _marker_missing(p, done_marker, sig[1])
            elif reason is None and age < incomplete_grace_seconds:
                reason = incomplete_reason(p)
                if reason:
                    reason += f" (ingested anyway once unchanged for {incomplete_grace_seconds:g} s)"
            if reason is not None:
                seen[str(p)] = [*sig, None]
                waiting.append(str(p))
                why[str(p)] = reason
                continue
            key = before[3] if before is not None and len(before) > 3 and before[3] else drop_key(p)
            if _signature(p) != sig:  # a writer resumed while we hashed: next tick
                seen[str(p)] = [*_signature(p), None]
                waiting.append(str(p))
                why[str(p)] = "changed while it was hashed"
                continue
        except FileNotFoundError:  # removed or renamed mid-scan: it will be seen again under its new name
            continue
        seen[str(p)] = [*sig, key]
        if key in known_keys or key in ready:
            skipped += 1
            continue
        ready[key] = Drop(key=key, path=p, size=sig[0])
    return ScanResult(ready=list(ready.values()), seen=seen, waiting=waiting, unchanged_skipped=skipped, why=why)


def completion_rules(source: Any) -> dict[str, Any]:
    """scan_incoming's completion keywords from a SourceSpec."""
    return {
        "done_marker": source.done_marker,
        "incomplete_grace_seconds": source.incomplete_grace_seconds,
        "wait_for_writers": source.wait_for_writers,
    }


def find_drop(incoming: Path, glob: str, key: str) -> Path:
    """The file in the incoming folder whose content has this partition key."""
    for p in candidate_files(incoming, glob):
        if drop_key(p) == key:
            return p
    raise FileNotFoundError(
        f"no file in {incoming} (matching '{glob}') has content hash {key}: the dropped file was moved, "
        "deleted or changed after it was registered. Put the original file back, or delete this partition "
        "in the Dagster UI and drop the new file."
    )
