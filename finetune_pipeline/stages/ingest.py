"""Per drop: store the dropped file (raw_dataset), then clean it and decide whether training may use it
(cleaned_dataset)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_pipeline.data.clean import CleanResult, clean_file, frame_digest, schema_problems, write_parquet_atomic
from finetune_pipeline.data.drift import DriftReport, drift
from finetune_pipeline.data.drops import file_digest, find_drop
from finetune_pipeline.layout import PipelineLayout, RawDropRecord
from finetune_pipeline.spec import LoadedSpec

LogFn = Callable[[str], None]


def store_raw(layout: PipelineLayout, spec: LoadedSpec, drop: str, source_file: str | None) -> RawDropRecord:
    """Copy the dropped file byte for byte into the state root; the copy keeps the file's extension."""
    src = spec.spec.source
    source = (
        Path(source_file)
        if source_file and Path(source_file).exists()
        else find_drop(spec.incoming_dir, src.file_glob, drop)
    )
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
    data = dest.read_bytes()
    rec = RawDropRecord(
        drop=drop,
        source_file=str(source),
        stored_at=str(dest),
        bytes=len(data),
        lines=data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1),
        sha256=digest,
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
    c = spec.spec.cleaning
    return c.min_tokens is not None or c.max_tokens is not None


def ingest_drop(layout: PipelineLayout, spec: LoadedSpec, drop: str, log: LogFn = print) -> DropRecord:
    """Clean one stored drop; keep its rows for training only when every blocking gate passes."""
    raw = layout.raw(drop)
    if not raw.exists():
        raise FileNotFoundError(f"raw_dataset for drop {drop} is missing at {raw}: materialize raw_dataset first")
    s = spec.spec
    rec_file = layout.raw_record(drop)
    source_name = RawDropRecord.load(rec_file).source_file if rec_file.exists() else None  # what the user dropped
    counter = token_counter(layout) if needs_tokenizer(spec) else None
    res = clean_file(raw, drop, s, count_tokens=counter, source_name=source_name)
    write_parquet_atomic(res.quarantine, layout.quarantine(drop))
    write_parquet_atomic(res.duplicates, layout.duplicates(drop))
    if s.cleaning.pii.mode != "off":
        write_parquet_atomic(res.pii, layout.pii(drop))
        log(f"cleaning.pii ({s.cleaning.pii.mode}): {res.pii_counts or 'nothing'} found in {len(res.pii)} rows")
    for note in res.notes:
        log(f"{Path(source_name).name if source_name else raw.name}: {note}")
    log(
        f"{res.rows_in} rows in ({res.file_format}, {res.record_format}): {len(res.kept)} kept, "
        f"{len(res.quarantine)} quarantined {res.reasons}, {len(res.duplicates) - res.near_duplicates} exact "
        f"and {res.near_duplicates} near duplicates"
    )
    schema = schema_problems(res.kept, text_only=res.record_format == "text")
    ok = res.accounted() and res.rejection_rate <= s.cleaning.max_rejection_rate and not schema
    if ok:
        write_parquet_atomic(res.kept, layout.kept(drop))  # only a drop that passed its gates is used for training
    else:
        layout.kept(drop).unlink(missing_ok=True)
        log(f"drop {drop} failed its quality gates: it is left out of dataset_splits")
    rep = None
    if s.drift.enabled and layout.split("train").exists() and len(res.kept):
        rep = drift(res.kept, pd.read_parquet(layout.split("train")))
        rep.save(layout.drift(drop))
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
