"""Over all drops: the train/validation/test splits (dataset_splits) and their token statistics (token_stats)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from finetune_pipeline.data.clean import write_parquet_atomic
from finetune_pipeline.data.split import SplitResult, build_splits, overlap_report
from finetune_pipeline.layout import SPLITS, PipelineLayout, SplitsManifest
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import LoadedSpec


@dataclass
class SplitsRecord:
    """The splits written, their manifest, and what the overlap and leak gates found."""

    manifest: SplitsManifest
    result: SplitResult
    overlaps: dict[str, Any]
    drops_left_out: list[str]

    @property
    def exact_overlap(self) -> int:
        return sum(v for k, v in self.overlaps.items() if k.endswith(("_content_overlap", "_id_overlap")))

    @property
    def no_test_leak(self) -> bool:
        return self.overlaps["train_test_content_overlap"] == 0 and self.result.leaks.empty

    @property
    def accounted(self) -> bool:
        """Every cleaned row is in a split, a cross-drop duplicate or the conflict quarantine."""
        r = self.result
        in_splits = sum(len(f) for f in r.frames.values())
        if r.train_pool >= 0:  # the training mix copies or leaves out train rows: count the split's own rows
            in_splits += r.train_pool - len(r.frames["train"])
        return r.rows_in == in_splits + len(r.cross_drop_duplicates) + len(r.conflict_quarantine)

    @property
    def near_cross_drop(self) -> int:
        return int((self.result.cross_drop_duplicates["kind"] == "near").sum())

    def label_mix(self) -> dict[str, dict[str, int]]:
        frames = self.result.frames
        if not any("label" in f and f["label"].notna().any() for f in frames.values()):
            return {}
        return {s: {str(k): int(v) for k, v in f["label"].value_counts().items()} for s, f in frames.items()}


def training_mix(spec: LoadedSpec) -> dict[str, tuple[float, int | None]] | None:
    """Per source (weight, max_rows) when there are several sources or a weight or cap is set; None otherwise."""
    sources = spec.source_list()
    if len(sources) == 1 and sources[0].weight == 1 and sources[0].max_rows is None:
        return None
    return {s.name: (s.weight, s.max_rows) for s in sources}


def build_dataset_splits(
    layout: PipelineLayout, spec: LoadedSpec, registered: list[str], log: LogFn = print
) -> SplitsRecord:
    """Combine every usable drop (in arrival order), dedup across drops, split, and write the splits."""
    drops = layout.usable_drops(registered)
    missing = [d for d in registered if d not in drops]
    if missing:
        log(f"drops not cleaned yet or blocked by their gates (left out): {missing}")
    res = build_splits(
        [pd.read_parquet(layout.kept(d)) for d in drops],
        spec.split,
        drops,
        spec.dedup,
        mix=training_mix(spec),
    )
    if res.frames["train"].empty:
        raise ValueError(
            f"the train split is empty ({sum(len(f) for f in res.frames.values())} rows in all): "
            "add data or lower split.validation_fraction / split.test_fraction"
        )
    for s in SPLITS:
        write_parquet_atomic(res.frames[s], layout.split(s))
    write_parquet_atomic(res.cross_drop_duplicates, layout.cross_drop_duplicates)
    write_parquet_atomic(res.leaks, layout.test_train_leaks)
    write_parquet_atomic(res.conflicts, layout.conflicts)
    write_parquet_atomic(res.conflict_quarantine, layout.conflict_quarantine)
    manifest = SplitsManifest(
        drops=res.drops,
        digests=res.digests,
        version=res.combined_digest,
        counts={s: len(res.frames[s]) for s in SPLITS},
        spec_hash=spec.spec_hash,
    )
    manifest.save(layout.splits_manifest)
    rec = SplitsRecord(manifest, res, overlap_report(res.frames), missing)
    log(
        f"splits {manifest.counts} from {len(res.drops)} drop(s); "
        f"{len(res.cross_drop_duplicates)} cross-drop duplicates removed ({rec.near_cross_drop} near); "
        f"{len(res.conflicts)} label conflicts ({res.conflict_share:.1%} of rows, dedup.conflicts="
        f"{spec.dedup.conflicts}: {len(res.conflict_quarantine)} rows quarantined)"
        + (f"; training mix per source: {res.mix.to_dict(orient='records')}" if len(res.mix) else "")
    )
    return rec


@dataclass
class TokenStats:
    stats: dict[str, dict[str, float]]
    max_length: int
    histogram: bytes

    @property
    def share_over_max_length(self) -> float:
        return float(self.stats["train"].get("over_max_length_share", 0.0))


def token_stats(layout: PipelineLayout, spec: LoadedSpec) -> TokenStats:
    """Token lengths of every split with the base model's tokenizer and chat template, against max_length."""
    import json

    from finetune_pipeline.data.tokens import TokenCounter, length_stats
    from finetune_pipeline.plots import token_histogram

    counter = TokenCounter(layout.read_base().tokenizer_dir)
    max_len = spec.training.max_length
    frames = layout.read_split_frames(columns=["messages"])
    lengths = {s: counter(frames[s]["messages"].tolist()) for s in SPLITS}
    stats = {s: length_stats(lengths[s], max_len) for s in SPLITS}
    layout.token_stats.write_text(json.dumps(stats, indent=2))
    return TokenStats(stats, max_len, token_histogram(lengths, max_len))


EOT_SAMPLE_ROWS = 1000  # training rows the pre-training end-of-turn check tokenises (evenly spread over the split)


@dataclass
class EndOfTurnCheck:
    """The end-of-turn contract on the training split before the adapter starts (the child checks trl's own rows
    again): its verdict, a message that shows one failing row and what to fix, and the counts."""

    passed: bool
    message: str
    metadata: dict[str, Any]


def end_of_turn_check(layout: PipelineLayout, spec: LoadedSpec) -> EndOfTurnCheck:
    """Tokenise (a spread sample of) the training rows with the chat template and loss mask training will use and
    check that every loss-carrying turn ends with the end-of-turn token inside the mask and no row is all-masked."""
    from finetune_pipeline.models.base import load_tokenizer
    from finetune_pipeline.training import contract
    from finetune_pipeline.training.chat import resolve_chat_template

    t = spec.training
    tok = load_tokenizer(layout.read_base().tokenizer_dir, spec.model.trust_remote_code)
    try:
        chat = resolve_chat_template(tok, t.chat_template, spec.base_dir, need_markers=t.assistant_only_loss)
    except (ValueError, FileNotFoundError) as e:  # the training child would stop on the same error
        return EndOfTurnCheck(False, str(e), {"chat_template": t.chat_template})
    chat.install(tok)
    train = layout.read_split_frames(columns=["row_id", "messages"])["train"]
    step = max(1, -(-len(train) // EOT_SAMPLE_ROWS))
    sample = train.iloc[::step]
    report = contract.check_messages(tok, chat.template, sample["messages"].tolist(), t)
    if report.example:  # name the row as the splits do, not by its place in the sample
        report.example["row"] = str(sample["row_id"].iloc[report.example["row"]])
    meta = {**report.as_metadata(), "chat_template": chat.source, "rows_in_split": len(train)}
    return EndOfTurnCheck(report.passed, report.message(), meta)
