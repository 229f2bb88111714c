"""Per drop: store the dropped file (raw_dataset), then clean it and decide whether training may use it
(cleaned_dataset)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from finetune_pipeline.data.clean import CleanResult, clean_file, frame_digest, schema_problems, write_parquet_atomic
from finetune_pipeline.data.clean_store import read_rows
from finetune_pipeline.data.drift import MAX_ROWS as DRIFT_MAX_ROWS
from finetune_pipeline.data.drift import DriftReport, drift
from finetune_pipeline.data.drops import (
    ScanResult,
    candidate_files,
    completion_rules,
    file_digest,
    find_drop,
    scan_incoming,
)
from finetune_pipeline.data.readers.record_formats import plain_text
from finetune_pipeline.layout import PipelineLayout, RawDropRecord
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import LoadedSpec, SourceSpec


def source_of(spec: LoadedSpec, path: Path) -> SourceSpec | None:
    """The spec source whose folder and glob select this file (None when none does)."""
    target = path.resolve()
    for src in spec.source_list():
        if target in {p.resolve() for p in candidate_files(spec.incoming_of(src), src.file_glob, src.done_marker)}:
            return src
    return None


def locate_drop(spec: LoadedSpec, drop: str, source_file: str | None) -> tuple[Path, SourceSpec]:
    """The dropped file of a partition and the source it belongs to (the sensor's file when it still exists)."""
    if source_file and Path(source_file).exists():
        path = Path(source_file)
        return path, source_of(spec, path) or spec.source_list()[0]
    missing: FileNotFoundError | None = None
    for src in spec.source_list():
        try:
            return find_drop(spec.incoming_of(src), src.file_glob, drop), src
        except FileNotFoundError as exc:
            missing = missing or exc
    assert missing is not None
    raise missing


def scan_sources(spec: LoadedSpec, previous: dict[str, list], known: set[str]) -> ScanResult:
    """scan_incoming over every source's folder, merged (a content seen in two sources is one drop)."""
    ready, seen, waiting, skipped, why = [], {}, [], 0, {}
    for src in spec.source_list():
        scan = scan_incoming(
            spec.incoming_of(src), src.file_glob, src.settle_seconds, previous, known, **completion_rules(src)
        )
        new = [d for d in scan.ready if d.key not in known]
        known = known | {d.key for d in new}
        ready += new
        seen.update(scan.seen)
        waiting += scan.waiting
        skipped += scan.unchanged_skipped + len(scan.ready) - len(new)
        why.update(scan.why)
    return ScanResult(ready, seen, waiting, skipped, why)


def _line_count(path: Path, block: int = 1 << 20) -> tuple[int, int]:
    """Bytes and lines of a file (a last line without a newline counts), read a block at a time."""
    size, lines, last = 0, 0, b""
    with path.open("rb") as f:
        while chunk := f.read(block):
            size += len(chunk)
            lines += chunk.count(b"\n")
            last = chunk
    return size, lines + (0 if last.endswith(b"\n") or not size else 1)


def store_raw(layout: PipelineLayout, spec: LoadedSpec, drop: str, source_file: str | None) -> RawDropRecord:
    """Copy the dropped file byte for byte into the state root; the copy keeps the file's extension; the record
    remembers which spec source the file came from."""
    source, src = locate_drop(spec, drop, source_file)
    dest = layout.raw_for(drop, "".join(source.suffixes[-1:]) or ".jsonl")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copyfile(source, tmp)
    digest = file_digest(tmp)
    if digest[:16] != drop:
        tmp.unlink()
        raise ValueError(
            f"{source} changed since it was registered as drop {drop} (its content hash is now {digest[:16]}). "
            "Files in the incoming folder must not be edited in place: drop the new version as a new file."
        )
    tmp.replace(dest)
    size, lines = _line_count(dest)
    rec = RawDropRecord(
        drop=drop,
        source_file=str(source),
        stored_at=str(dest),
        bytes=size,
        lines=lines,
        sha256=digest,
        source=src.name,
    )
    rec.save(layout.raw_record(drop))
    return rec


@dataclass
class DropRecord:
    """What cleaning one drop found, and whether its gates let training use it."""

    drop: str
    raw_path: Path
    result: CleanResult
    schema_problems: list[str]
    max_rejection_rate: float
    used_for_training: bool
    data_version: str
    drift: DriftReport | None = None
    drift_warn_threshold: float = 0.0
    notes: list[str] = field(default_factory=list)
    pii_mode: str = "off"

    @property
    def rejection_ok(self) -> bool:
        return self.result.rejection_rate <= self.max_rejection_rate

    @property
    def drift_warns(self) -> bool:
        return self.drift is not None and self.drift.score >= self.drift_warn_threshold


def token_counter(layout: PipelineLayout) -> Any:
    """Counts tokens with the tokenizer folder the base_model asset produced (never provisions a model itself)."""
    from finetune_pipeline.data.tokens import TokenCounter

    return TokenCounter(layout.read_base().tokenizer_dir)


def needs_tokenizer(spec: LoadedSpec) -> bool:
    """Token bounds in the cleaning rules make cleaned_dataset depend on base_model."""
    c = spec.cleaning
    return c.min_tokens is not None or c.max_tokens is not None


def drift_rows(res: CleanResult, kept_file: Path) -> pd.DataFrame:
    """The kept rows drift compares (its deterministic sample: the lowest content hashes), with their messages
    read back from the file they were written to."""
    if res.kept_path is None:
        return res.kept
    pos = np.argsort(res.kept["content_hash"].to_numpy(dtype=str), kind="stable")[:DRIFT_MAX_ROWS]
    return read_rows(kept_file, pos, ["messages", "content_hash", "chars", "n_messages", "label"])


def ingest_drop(layout: PipelineLayout, spec: LoadedSpec, drop: str, log: LogFn = print) -> DropRecord:
    """Clean one stored drop; keep its rows for training only when every blocking gate passes."""
    raw = layout.raw(drop)
    if not raw.exists():
        raise FileNotFoundError(f"raw_dataset for drop {drop} is missing at {raw}: materialize raw_dataset first")
    s = spec.spec
    rec_file = layout.raw_record(drop)
    raw_rec = RawDropRecord.load(rec_file) if rec_file.exists() else None
    source_name = raw_rec.source_file if raw_rec else None  # what the user dropped
    src = s.source_named(raw_rec.source if raw_rec else None)
    counter = token_counter(layout) if needs_tokenizer(spec) else None
    kept_file = layout.kept(drop)
    staged = kept_file.with_name(f".{kept_file.name}.staged")  # the kept rows, written batch by batch
    res = clean_file(
        raw,
        drop,
        s,
        count_tokens=counter,
        source_name=source_name,
        source=src,
        kept_path=staged,
        quarantine_path=layout.quarantine(drop),
    )
    if res.quarantine_path is None:  # the file could not be read: one row, in memory
        write_parquet_atomic(res.quarantine, layout.quarantine(drop))
    write_parquet_atomic(res.duplicates, layout.duplicates(drop))
    if s.cleaning.pii.mode != "off":
        write_parquet_atomic(res.pii, layout.pii(drop))
        log(f"cleaning.pii ({s.cleaning.pii.mode}): {res.pii_counts or 'nothing'} found in {len(res.pii)} rows")
    for note in res.notes:
        log(f"{Path(source_name).name if source_name else raw.name}: {note}")
    log(
        f"{res.rows_in} rows in ({res.file_format}, {res.record_format}): {len(res.kept)} kept, "
        f"{res.quarantined} quarantined {res.reasons}, {len(res.duplicates) - res.near_duplicates} exact "
        f"and {res.near_duplicates} near duplicates"
    )
    schema = (res.kept_problems or []) + schema_problems(res.kept, text_only=plain_text(res.record_format))
    ok = res.accounted() and res.rejection_rate <= s.cleaning.max_rejection_rate and not schema
    rep = None
    if s.drift.enabled and layout.split("train").exists() and len(res.kept):
        rep = drift(drift_rows(res, staged), pd.read_parquet(layout.split("train")))
        rep.save(layout.drift(drop))
    if ok and res.kept_path is not None:
        staged.replace(kept_file)  # only a drop that passed its gates is used for training
    elif ok:
        write_parquet_atomic(res.kept, kept_file)
    else:
        kept_file.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
        log(f"drop {drop} failed its quality gates: it is left out of dataset_splits")
    return DropRecord(
        drop=drop,
        raw_path=raw,
        result=res,
        schema_problems=schema,
        max_rejection_rate=s.cleaning.max_rejection_rate,
        used_for_training=ok,
        data_version=frame_digest(res.kept, ["row_id", "content_hash"]),
        drift=rep,
        drift_warn_threshold=s.drift.warn_threshold,
        notes=res.notes,
        pii_mode=s.cleaning.pii.mode,
    )
