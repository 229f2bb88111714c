"""Clean one dropped file: read any format, normalise to one chat schema, validate, score, dedup, quarantine the rest.

Nothing is lost: every record ends up kept, quarantined (with a machine-readable reason, a detail and its
source line) or deduplicated (with the row it matched, exactly or as a near-duplicate), so
``rows_in = kept + quarantined + deduplicated``. A file that cannot be read at all becomes one quarantine
entry whose detail names the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from finetune_pipeline.data import labels, normalize, quality
from finetune_pipeline.data.clean_store import (
    MemoryQuarantine,
    MemoryStore,
    ParquetQuarantine,
    ParquetStore,
    row_problems,
)
from finetune_pipeline.data.near_stream import NearDedupStream
from finetune_pipeline.data.readers import RAW_PREVIEW_CHARS, FileProblem, ReadResult, Reject, read_file, safe_text
from finetune_pipeline.data.readers.record_formats import plain_text
from finetune_pipeline.spec import PipelineSpec, SourceSpec

KEPT_COLUMNS = [
    "row_id",
    "messages",
    "content_hash",
    "drop",
    "source",
    "source_line",
    "label",
    "timestamp",
    "n_messages",
    "chars",
    "quality",
    "tokens",
]
QUARANTINE_HEAD_ROWS = 1000  # quarantine rows a result written to files holds (the rest are in the file)
QUARANTINE_COLUMNS = ["drop", "source_line", "reason", "detail", "raw"]
DUPLICATE_COLUMNS = ["drop", "source_line", "row_id", "duplicate_of", "content_hash", "kind", "similarity"]
PII_COLUMNS = ["drop", "source_line", "row_id", "kinds", "outcome", "preview"]


@dataclass
class CleanResult:
    kept: pd.DataFrame
    quarantine: pd.DataFrame
    duplicates: pd.DataFrame
    rows_in: int
    blank_lines: int
    reasons: dict[str, int] = field(default_factory=dict)
    file_format: str = ""
    record_format: str = ""
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    pii: pd.DataFrame = field(default_factory=lambda: _empty(PII_COLUMNS))  # rows with personal data or secrets
    pii_counts: dict[str, int] = field(default_factory=dict)  # findings per kind (cleaning.pii)
    kept_path: Path | None = None  # where the kept rows were written (clean_file's kept_path; then no messages)
    kept_problems: list[str] | None = None  # chat-schema problems found while writing kept_path
    n_quarantined: int | None = None  # rows in the quarantine (with quarantine_path: more than ``quarantine`` holds)
    quarantine_path: Path | None = None  # where the quarantine was written (clean_file's quarantine_path)

    @property
    def quarantined(self) -> int:
        return len(self.quarantine) if self.n_quarantined is None else self.n_quarantined

    @property
    def rejection_rate(self) -> float:
        return self.quarantined / self.rows_in if self.rows_in else 0.0

    def accounted(self) -> bool:
        return self.rows_in == len(self.kept) + self.quarantined + len(self.duplicates)

    @property
    def near_duplicates(self) -> int:
        return int((self.duplicates["kind"] == "near").sum()) if len(self.duplicates) else 0


def _row_preview(table: pa.Table, positions: np.ndarray) -> list[str]:
    rows = table.take(pa.array(positions)).drop_columns(["_line"]).to_pylist()
    return [
        json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False)[:RAW_PREVIEW_CHARS] for r in rows
    ]


def parse_timestamps(values: pd.Series) -> pd.Series:
    """ISO 8601 strings or epoch seconds to UTC timestamps; NaT where neither parses."""
    s = values.astype("string")
    num = pd.to_numeric(s, errors="coerce")
    out = pd.to_datetime(s.where(num.isna()), utc=True, errors="coerce", format="ISO8601")
    epoch = pd.to_datetime(num, unit="s", utc=True, errors="coerce")
    return out.where(num.isna(), epoch)


def clean_file(
    path: Path,
    drop: str,
    spec: PipelineSpec,
    count_tokens: Any = None,
    *,
    source_name: str | None = None,
    source: SourceSpec | None = None,
    kept_path: Path | None = None,
    quarantine_path: Path | None = None,
) -> CleanResult:
    """Parse and clean one drop file. Never raises for bad rows; each goes to the quarantine.

    ``source_name`` is the file the user dropped (``path`` is usually its stored copy): file-level messages name
    it. ``count_tokens(list[str] messages JSON) -> np.ndarray`` enables cleaning.min_tokens / max_tokens.
    ``source``: the spec source the file came from (its formats, column map and labels; default the first); its
    name is stored in every kept row's ``source`` column.

    The file streams through: each batch the reader makes is normalised, checked, scored and exact-deduplicated
    on its own; only a few fields per row (ids, lines, hashes, the near dedup's MinHash signature) outlive it.
    ``kept_path``: the kept rows are written there batch by batch, and the result's ``kept`` holds every column
    but ``messages`` (with ``kept_problems``: the chat-schema problems found while writing). Without it the kept
    rows are collected in memory (whole rows in ``kept``). ``quarantine_path``: likewise the quarantine, in line
    order; the result's ``quarantine`` then holds its first QUARANTINE_HEAD_ROWS rows and ``quarantined`` counts
    them all."""
    src = source or spec.source_list()[0]
    run = _Run(
        drop,
        spec,
        src,
        count_tokens,
        ParquetStore(kept_path) if kept_path else MemoryStore(),
        ParquetQuarantine(quarantine_path, QUARANTINE_HEAD_ROWS) if quarantine_path else MemoryQuarantine(),
    )
    t0 = time.perf_counter()
    try:
        read = read_file(path, src, source_name=source_name, on_tables=run.chunk)
    except FileProblem as exc:
        run.store.discard()
        run.quarantine.discard()
        q = pd.DataFrame([{"drop": drop, "source_line": 0, "reason": exc.reason, "detail": str(exc), "raw": ""}])
        return CleanResult(_empty(KEPT_COLUMNS), q, _empty(DUPLICATE_COLUMNS), 1, 0, {exc.reason: 1}, notes=[str(exc)])
    run.timings["parse"] = time.perf_counter() - t0 - sum(run.timings.values())
    return run.finish(read)


@dataclass
class _Work:
    """One batch of a file on its way through the steps of clean_file: its rows and what was said about them."""

    kept: pd.DataFrame
    rejects: list[Reject]
    prompt: pa.Array  # per row: the prompt side (near dedup)
    final: pa.Array  # per row: the final answer (near dedup)
    answer: pa.Array  # per row: the assistant turns (quality score)
    timings: dict[str, float]
    pii_parts: list[pd.DataFrame]
    drop_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # quarantined by a row check
    alive: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # kept after the exact dedup
    moved: int = 0  # conversations whose leading assistant turns were moved or dropped

    def reject_rows(self, mask: np.ndarray, why: str, detail_of: Any) -> None:
        """Quarantine the rows in ``mask`` not already quarantined, with ``detail_of(i)``."""
        kept, new = self.kept, mask & ~self.drop_mask
        for i in np.flatnonzero(new):
            self.rejects.append(
                Reject(int(kept["source_line"].iat[i]), why, detail_of(i), kept["messages"].iat[i][:RAW_PREVIEW_CHARS])
            )
        self.drop_mask[new] = True


class _Run:
    """One file's cleaning: ``chunk`` takes each group of tables the reader makes, ``finish`` the reader's result.

    Between batches it keeps the rejects, the exact dedup's first row per content key, the duplicates found, the
    PII rows, the near dedup's signatures and, per kept row, its id, line and content hash."""

    def __init__(self, drop: str, spec: PipelineSpec, src: SourceSpec, count_tokens: Any, store: Any, quarantine: Any):
        self.drop, self.spec, self.src, self.count_tokens, self.store = drop, spec, src, count_tokens, store
        self.quarantine = quarantine
        self.reasons: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self.moved = 0
        self.seen: dict[Any, str] = {}  # content key -> row id of the first row kept with it
        self.dups: list[pd.DataFrame] = []
        self.pii_tables: list[pd.DataFrame] = []
        self.pii_counts: dict[str, int] = {}
        self.ids: list[np.ndarray] = []
        self.lines: list[np.ndarray] = []
        self.hashes: list[np.ndarray] = []
        d = spec.dedup
        self.near = NearDedupStream(d.near_threshold, d.num_perm, d.ngram, d.boilerplate_share) if d.near else None

    def _time(self, name: str, t0: float) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def chunk(self, pairs: list[tuple[pa.Table, str]]) -> None:
        w = _normalise_tables(pairs, self.src, self.spec, self.timings)
        if w is None:
            return
        self.moved += w.moved
        _check_row_fields(w, self.spec, self.src)
        _score_quality(w, self.spec)
        _count_tokens(w, self.spec, self.count_tokens)
        _assign_row_ids(w, self.drop, self.src)
        self._exact_dedup(w)
        for r in w.rejects:
            self.reasons[r.reason] = self.reasons.get(r.reason, 0) + 1
        self.quarantine.add(self._quarantine_frame(w.rejects))
        t0 = time.perf_counter()
        live = np.flatnonzero(w.alive)
        pick = pa.array(live, pa.int64())
        prompt, final = w.prompt.take(pick), w.final.take(pick)
        kept = w.kept[KEPT_COLUMNS].iloc[live].reset_index(drop=True)
        for c in ("messages", "content_hash"):  # plain Python strings for the code downstream
            kept[c] = kept[c].to_numpy(dtype=object)
        self.ids.append(kept["row_id"].to_numpy())
        self.lines.append(kept["source_line"].to_numpy())
        self.hashes.append(kept["content_hash"].to_numpy())
        if w.pii_parts:
            table, counts = _pii_report(
                w.pii_parts, w.kept[["source_line", "row_id", "messages"]], w.alive, w.drop_mask, self.drop, self.spec
            )
            self.pii_tables.append(table)
            for k, v in counts.items():
                self.pii_counts[k] = self.pii_counts.get(k, 0) + v
        self._time("select", t0)
        if self.near is not None:
            t0 = time.perf_counter()
            self.near.add(prompt, final)
            self._time("near_dedup", t0)
        self.store.add(kept, prompt, final)

    def _exact_dedup(self, w: _Work) -> None:
        """A row whose content key an earlier kept row has (in this batch or an earlier one) is a duplicate of it."""
        t0 = time.perf_counter()
        kept = w.kept  # w.alive: the rows no row check quarantined (_assign_row_ids)
        key = (kept.pop("_key") if "_key" in kept else kept["content_hash"]).to_numpy()
        row_id = kept["row_id"].to_numpy()
        rows, owners = [], []
        for pos, k in zip(np.flatnonzero(w.alive).tolist(), key[w.alive].tolist(), strict=True):
            owner = self.seen.get(k)
            if owner is None:
                self.seen[k] = row_id[pos]
            else:
                rows.append(pos)
                owners.append(owner)
        if rows:
            at = np.asarray(rows, np.int64)
            self.dups.append(
                pd.DataFrame(
                    {
                        "drop": self.drop,
                        "source_line": kept["source_line"].to_numpy()[at],
                        "row_id": row_id[at],
                        "duplicate_of": owners,
                        "content_hash": kept["content_hash"].to_numpy()[at],
                        "kind": "exact",
                        "similarity": 1.0,
                    }
                )
            )
            w.alive[at] = False
        self._time("exact_dedup", t0)

    def finish(self, read: ReadResult) -> CleanResult:
        """The near duplicates among all kept rows, then the kept rows, the quarantine in line order, the
        duplicates and the PII report."""
        drop = self.drop
        notes = list(read.notes)
        if self.moved:
            how = "kept as context in the system message" if self.src.leading_assistant == "context" else "dropped"
            notes.append(
                f"{self.moved} conversations began with assistant turns: those turns were {how} "
                "(source.leading_assistant)"
            )
        ids, lines, hashes = (
            np.concatenate(x) if x else np.zeros(0, object) for x in (self.ids, self.lines, self.hashes)
        )
        alive = np.ones(len(ids), bool)
        if self.near is not None and len(ids) > 1:
            t0 = time.perf_counter()
            nd = self.near.finish(self.store.texts)
            if len(nd.row):
                self.dups.append(
                    pd.DataFrame(
                        {
                            "drop": drop,
                            "source_line": lines[nd.row],
                            "row_id": ids[nd.row],
                            "duplicate_of": ids[nd.matched],
                            "content_hash": hashes[nd.row],
                            "kind": "near",
                            "similarity": np.round(nd.similarity, 4),
                        }
                    )
                )
                alive[nd.row] = False
            self._time("near_dedup", t0)
        t0 = time.perf_counter()
        kept, problems = self.store.finish(alive, KEPT_COLUMNS, plain_text(read.record_format))
        self._time("select", t0)
        quarantine, n_quarantined = self.quarantine.finish(self._quarantine_frame(read.rejects))
        reasons = dict(self.reasons)
        for r in read.rejects:
            reasons[r.reason] = reasons.get(r.reason, 0) + 1
        duplicates = (
            pd.concat(self.dups, ignore_index=True)[DUPLICATE_COLUMNS] if self.dups else _empty(DUPLICATE_COLUMNS)
        )
        return CleanResult(
            kept=kept,
            quarantine=quarantine,
            duplicates=duplicates.sort_values("source_line", kind="stable").reset_index(drop=True),
            rows_in=read.rows_in,
            blank_lines=read.blank_lines,
            reasons={str(k): int(v) for k, v in sorted(reasons.items())},
            file_format=read.file_format,
            record_format=read.record_format,
            notes=notes,
            timings=self.timings,
            pii=self._pii(lines[~alive]),
            pii_counts=dict(sorted(self.pii_counts.items())),
            kept_path=self.store.path,
            kept_problems=problems,
            n_quarantined=n_quarantined,
            quarantine_path=self.quarantine.path,
        )

    def _quarantine_frame(self, rejects: list[Reject]) -> pd.DataFrame:
        """Rejected rows as quarantine rows in line order (previews masked under cleaning.pii mask)."""
        if self.spec.cleaning.pii.mode == "mask":
            rejects = _scrub_rejects(rejects, self.spec)
        rows = [
            {
                "drop": self.drop,
                "source_line": r.line,
                "reason": r.reason,
                "detail": safe_text(r.detail),
                "raw": safe_text(r.raw),
            }
            for r in rejects
        ]
        return (
            pd.DataFrame(rows, columns=QUARANTINE_COLUMNS)
            .sort_values("source_line", kind="stable")
            .reset_index(drop=True)
        )

    def _pii(self, near_lines: np.ndarray) -> pd.DataFrame:
        """The PII rows of every batch; a row found to be a near duplicate at the end says so."""
        if not self.pii_tables:
            return _empty(PII_COLUMNS)
        table = pd.concat(self.pii_tables, ignore_index=True)
        late = (table["outcome"] == "kept") & table["source_line"].isin(near_lines)
        table.loc[late, "outcome"] = "duplicate"
        return table


def _normalise_tables(
    pairs: list[tuple[pa.Table, str]], src: SourceSpec, spec: PipelineSpec, timings: dict[str, float]
) -> _Work | None:
    """Each table to the chat schema (normalize.normalise); invalid rows become rejects; rows in file order."""
    cols = src.columns
    rejects: list[Reject] = []
    frames: list[pd.DataFrame] = []
    texts: list[tuple[pa.Array, pa.Array, pa.Array]] = []
    pii_parts: list[pd.DataFrame] = []
    t0 = time.perf_counter()
    pairs = [(t, f) for t, f in pairs if t.num_rows]
    if not pairs:
        return None
    results = [
        normalize.normalise(t, f, cols, spec.cleaning, roles=src.role_map(), leading_assistant=src.leading_assistant)
        for t, f in pairs
    ]
    for (table, _), res in zip(pairs, results, strict=True):
        lines = table.column("_line").to_numpy()
        if len(res.reject_rows):
            previews = _row_preview(table, res.reject_rows)
            for pos, why, det, raw in zip(
                res.reject_rows, res.reject_reasons, res.reject_details, previews, strict=True
            ):
                rejects.append(Reject(int(lines[pos]), str(why), det, raw))
        f = res.frame
        ok = f.pop("_pos").to_numpy()
        f["source_line"] = lines[ok]
        for name, col in (("id", cols.id), ("label", cols.label), ("timestamp", cols.timestamp)):
            if col:  # absent columns are added once, after the concat (object columns of None concat slowly)
                f[name] = table.column(col).take(pa.array(ok)).to_numpy(zero_copy_only=False)
        frames.append(f)
        if res.pii is not None and len(res.pii):
            pii_parts.append(pd.DataFrame({"source_line": lines[res.pii["pos"].to_numpy()], "kind": res.pii["kind"]}))
        texts.append((res.prompt_text, res.answer_text, res.assistant_text))
    kept = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    for name in ("id", "label", "timestamp"):
        if name not in kept:
            kept[name] = None
    prompt, final, answer = (pa.concat_arrays([t[k] for t in texts]) for k in range(3))
    if len({f for _, f in pairs}) > 1 and len(kept):  # a mixed file: rows back in file order
        order = np.argsort(kept["source_line"].to_numpy(), kind="stable")
        kept = kept.iloc[order].reset_index(drop=True)
        prompt, final, answer = (x.take(pa.array(order)) for x in (prompt, final, answer))
    timings["normalise"] = timings.get("normalise", 0.0) + time.perf_counter() - t0
    moved = sum(r.leading_moved for r in results)
    return _Work(kept, rejects, prompt, final, answer, timings, pii_parts, np.zeros(len(kept), bool), moved=moved)


def _check_row_fields(w: _Work, spec: PipelineSpec, src: SourceSpec) -> None:
    """Timestamps (parsed; required by a temporal split), labels (normalised; required by a stratified split)."""
    cols, kept = src.columns, w.kept
    if cols.timestamp:
        ts = parse_timestamps(kept["timestamp"])
        if spec.split.method == "temporal":
            w.reject_rows(
                ts.isna().to_numpy(),
                "bad_timestamp",
                lambda i: (
                    f"timestamp {kept['timestamp'].iat[i]!r} in '{cols.timestamp}' is not ISO 8601 or epoch seconds"
                ),
            )
        kept["timestamp"] = ts.dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").where(ts.notna(), None)
    if cols.label and src.labels.active:
        kept["label"], unknown = labels.normalise_labels(kept["label"], src.labels)
        w.reject_rows(
            unknown,
            "unknown_label",
            lambda i: (
                f"label {kept['label'].iat[i]!r} in '{cols.label}' is not in source.labels.mapping (source.labels.unmapped is "
                "quarantine): add it to the mapping or set unmapped: keep"
            ),
        )
    if spec.split.method == "stratified":
        lab = kept["label"]
        w.reject_rows(
            (lab.isna() | (lab.astype("string").str.strip() == "")).to_numpy(),
            "missing_label",
            lambda i: f"the label field '{cols.label}' is missing or empty (split.method is stratified)",
        )


def _score_quality(w: _Work, spec: PipelineSpec) -> None:
    cleaning = spec.cleaning
    t0 = time.perf_counter()
    w.kept["quality"] = 1.0
    if cleaning.quality.enabled and len(w.kept):
        q = quality.score(w.answer, cleaning.quality)
        w.kept["quality"] = np.round(q.score, 3)
        w.reject_rows(
            q.score < cleaning.quality.min_score,
            "low_quality",
            lambda i: q.explain(int(i)) + f" < cleaning.quality.min_score={cleaning.quality.min_score}",
        )
    w.timings["quality"] = w.timings.get("quality", 0.0) + time.perf_counter() - t0


def _count_tokens(w: _Work, spec: PipelineSpec, count_tokens: Any) -> None:
    """cleaning.min_tokens / max_tokens, counted by the base model's tokenizer (when one is given)."""
    cleaning = spec.cleaning
    w.kept["tokens"] = None
    if count_tokens is None or (cleaning.min_tokens is None and cleaning.max_tokens is None) or not len(w.kept):
        return
    t0 = time.perf_counter()
    toks = np.asarray(count_tokens(w.kept["messages"].tolist()))
    w.kept["tokens"] = toks
    if cleaning.max_tokens is not None:
        w.reject_rows(
            toks > cleaning.max_tokens,
            "too_many_tokens",
            lambda i: f"{toks[i]} tokens > cleaning.max_tokens={cleaning.max_tokens}",
        )
    if cleaning.min_tokens is not None:
        w.reject_rows(
            toks < cleaning.min_tokens,
            "too_few_tokens",
            lambda i: f"{toks[i]} tokens < cleaning.min_tokens={cleaning.min_tokens}",
        )
    w.timings["tokens"] = w.timings.get("tokens", 0.0) + time.perf_counter() - t0


def _assign_row_ids(w: _Work, drop: str, src: SourceSpec) -> None:
    """The file's id where given and not empty, else the content hash. From here on rows are only marked (one
    filter at the end: filtering object columns is the slow part)."""
    kept = w.kept
    w.alive = ~w.drop_mask
    ids = kept.pop("id")
    given = ids.notna().to_numpy()
    if given.any():
        given &= ids.astype("string").str.len().fillna(0).to_numpy() > 0
    row_id = kept["content_hash"].to_numpy(dtype=object)
    row_id[given] = ids.to_numpy()[given]
    kept["row_id"] = row_id
    kept["drop"] = drop
    kept["source"] = src.name


def _pii_report(
    parts: list[pd.DataFrame],
    rows: pd.DataFrame | None,
    alive: np.ndarray,
    quarantined: np.ndarray,
    drop: str,
    spec: PipelineSpec,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows in which cleaning.pii found something (kinds with counts, what became of the row, a masked
    preview) and the findings per kind."""
    if not parts or rows is None:
        return _empty(PII_COLUMNS), {}
    from finetune_pipeline.data import pii

    found = pd.concat(parts, ignore_index=True)
    counts = {str(k): int(v) for k, v in found["kind"].value_counts().sort_index().items()}
    per_row = found.groupby("source_line")["kind"].agg(
        lambda k: ", ".join(f"{x}: {n}" for x, n in k.value_counts().sort_index().items())
    )
    idx = np.flatnonzero(rows["source_line"].isin(per_row.index).to_numpy())
    outcome = np.where(alive[idx], "kept", np.where(quarantined[idx], "quarantined", "duplicate"))
    messages = pa.array(rows["messages"].to_numpy()[idx].astype(str), pa.string())
    if spec.cleaning.pii.mode == "report":  # the text is unchanged: mask the preview only
        p = spec.cleaning.pii
        messages = pii.scan(messages, list(p.kinds), True, p.phone_region).texts
    lines = rows["source_line"].to_numpy()[idx]
    table = pd.DataFrame(
        {
            "drop": drop,
            "source_line": lines,
            "row_id": rows["row_id"].to_numpy()[idx],
            "kinds": per_row.reindex(lines).to_numpy(),
            "outcome": outcome,
            "preview": [m[:RAW_PREVIEW_CHARS] for m in messages.to_pylist()],
        },
        columns=PII_COLUMNS,
    )
    return table, counts


def _scrub_rejects(rejects: list[Reject], spec: PipelineSpec) -> list[Reject]:
    from finetune_pipeline.data import pii

    if not rejects:
        return rejects
    p = spec.cleaning.pii
    texts = pa.array([r.raw for r in rejects] + [r.detail for r in rejects], pa.string())
    masked = pii.scan(texts, list(p.kinds), True, p.phone_region).texts.to_pylist()
    n = len(rejects)
    return [Reject(r.line, r.reason, masked[n + i], masked[i]) for i, r in enumerate(rejects)]


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in columns})


def schema_problems(kept: pd.DataFrame, text_only: bool = False) -> list[str]:
    """Invariants of a cleaned drop: each row parses, has a user turn (except plain text), ends with a non-empty
    assistant answer, and row ids are unique. Empty list = fine. A result written to a file (``kept_path``) was
    checked row by row while it was written (``kept_problems``); its row ids are checked here."""
    problems = row_problems(kept["row_id"].tolist(), kept["messages"].tolist(), text_only) if "messages" in kept else []
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
