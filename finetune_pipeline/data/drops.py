"""Dropped data files: content-hash partition keys and the "is this file finished?" rule the sensor applies."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

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


def candidate_files(incoming: Path, glob: str) -> list[Path]:
    """Data files in the incoming folder, excluding hidden and in-progress names, oldest first."""
    if not incoming.is_dir():
        return []
    found = []
    for p in incoming.glob(glob):
        if p.name.startswith((".", "~")) or p.name.endswith(IGNORED_SUFFIXES):
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


def _signature(p: Path) -> list[int]:
    """What must stay the same between two looks for a file to count as finished: size, mtime and inode
    (a file swapped in by rename with the same size and mtime still differs by inode)."""
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def scan_incoming(
    incoming: Path,
    glob: str,
    settle_seconds: float,
    previous: dict[str, list] | None,
    known_keys: set[str],
    now: float | None = None,
) -> ScanResult:
    """Find files that are finished being written and not yet ingested.

    A file is ready when its size, mtime and inode equal those of the previous scan (``previous``, the
    last result's ``seen``) and it has not been modified for ``settle_seconds``; with ``previous=None``
    only the age rule applies. Files whose content hash is in
    ``known_keys`` are skipped, so a file seen twice, or copied under another name, never gives a second
    partition. Hashes of unchanged files are remembered in ``seen`` and not recomputed.
    """
    now = time.time() if now is None else now
    ready: dict[str, Drop] = {}
    seen: dict[str, list] = {}
    waiting: list[str] = []
    skipped = 0
    for p in candidate_files(incoming, glob):
        try:
            sig = _signature(p)
            before = (previous or {}).get(str(p))
            stable = previous is None or (before is not None and before[:3] == sig)
            if not (stable and now - sig[1] / 1e9 >= settle_seconds and sig[0] > 0):
                seen[str(p)] = [*sig, None]
                waiting.append(str(p))
                continue
            key = before[3] if before is not None and len(before) > 3 and before[3] else drop_key(p)
            if _signature(p) != sig:  # a writer resumed while we hashed: next tick
                seen[str(p)] = [*_signature(p), None]
                waiting.append(str(p))
                continue
        except FileNotFoundError:  # removed or renamed mid-scan: it will be seen again under its new name
            continue
        seen[str(p)] = [*sig, key]
        if key in known_keys or key in ready:
            skipped += 1
            continue
        ready[key] = Drop(key=key, path=p, size=sig[0])
    return ScanResult(ready=list(ready.values()), seen=seen, waiting=waiting, unchanged_skipped=skipped)


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
