"""Data assets: raw_dataset and cleaned_dataset per drop, dataset_splits over all drops, token_stats.

Each builder makes one asset: decorator, read inputs, one library call (finetune_pipeline.stages), the record
mapped to metadata and check results.
"""

import dagster as dg

from finetune_pipeline.defs.common import drops_partitions, key, logger, png_markdown, table
from finetune_pipeline.defs.resources import StateStore
from finetune_pipeline.keys import code_version
from finetune_pipeline.layout import SPLITS
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.data_readiness import data_readiness
from finetune_pipeline.stages.ingest import DropRecord, ingest_drop, needs_tokenizer, store_raw
from finetune_pipeline.stages.splits import SplitsRecord, build_dataset_splits, end_of_turn_check, token_stats

QUARANTINE_PREVIEW_ROWS = 200
SOURCE_TAG = "finetune/source_file"  # run tag the sensor sets: the file that was dropped


def raw_dataset_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=key(spec, "raw_dataset"),
        group_name=spec.name,
        partitions_def=drops_partitions(spec),
        code_version=code_version("finetune_pipeline.stages.ingest"),
        kinds={"file"},
    )
    def raw_dataset(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        """One dropped file, copied byte for byte into the state root (partition = content hash)."""
        layout = state.pipeline(spec.name)
        rec = store_raw(layout, spec, context.partition_key, context.run.tags.get(SOURCE_TAG))
        context.log.info(f"copied {rec.source_file} ({rec.bytes:,} bytes) to {rec.stored_at}")
        return dg.MaterializeResult(
            metadata={
                "source_file": dg.MetadataValue.path(rec.source_file),
                "stored_at": dg.MetadataValue.path(rec.stored_at),
                "bytes": rec.bytes,
                "lines": rec.lines,
                "sha256": rec.sha256,
            },
            data_version=dg.DataVersion(rec.drop),
        )

    return raw_dataset


CLEANED_CHECKS = {
    "rows_accounted": ("rows_in = kept + quarantined + deduplicated: nothing is lost.", True),
    "rejection_rate": ("Share of quarantined rows is within cleaning.max_rejection_rate.", True),
    "chat_schema": ("Every kept row is a chat with a user turn and a final non-empty assistant turn.", True),
    "drift": ("Warns when the drop drifts from the current training split (drift.warn_threshold).", False),
}


def cleaned_dataset_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "cleaned_dataset")
    deps = [key(spec, "raw_dataset")] + ([key(spec, "base_model")] if needs_tokenizer(spec) else [])

    @dg.asset(
        key=k,
        deps=deps,
        group_name=spec.name,
        partitions_def=drops_partitions(spec),
        code_version=code_version("finetune_pipeline.stages.ingest"),
        kinds={"pandas", "parquet"},
        check_specs=[dg.AssetCheckSpec(n, asset=k, description=d, blocking=b) for n, (d, b) in CLEANED_CHECKS.items()],
    )
    def cleaned_dataset(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        """One drop in any supported format, normalised to the chat schema, validated, quality-scored and deduplicated (exact and near); bad rows quarantined with their reason and line."""
        layout = state.pipeline(spec.name)
        rec = ingest_drop(layout, spec, context.partition_key, log=logger(context))
        if not rec.used_for_training:
            context.log.warning(f"drop {rec.drop} failed its quality gates: it is left out of dataset_splits")
        return dg.MaterializeResult(
            metadata=drop_metadata(rec, layout.kept(rec.drop), layout.quarantine(rec.drop)),
            data_version=dg.DataVersion(rec.data_version),
            check_results=drop_checks(rec),
        )

    return cleaned_dataset


def drop_metadata(rec: DropRecord, kept_path: object, quarantine_path: object) -> dict:
    """cleaned_dataset's metadata: counts, formats, reasons, the quarantine and duplicates tables, timings."""
    res = rec.result
    q = res.kept["quality"].astype(float) if len(res.kept) else None
    dup_cols = ["source_line", "row_id", "duplicate_of", "kind", "similarity"]
    return {
        "rows_in": res.rows_in,
        "kept": len(res.kept),
        "quarantined": res.quarantined,
        "deduplicated": len(res.duplicates),
        "exact_duplicates": len(res.duplicates) - res.near_duplicates,
        "near_duplicates": res.near_duplicates,
        "blank_lines": res.blank_lines,
        "file_format": res.file_format,
        "record_format": res.record_format,
        "notes": dg.MetadataValue.json(res.notes),
        "rejection_rate": round(res.rejection_rate, 4),
        "rejection_reasons": dg.MetadataValue.json(res.reasons),
        "quarantine": table(res.quarantine[["source_line", "reason", "detail", "raw"]], QUARANTINE_PREVIEW_ROWS),
        "quarantine_file": dg.MetadataValue.path(str(quarantine_path)),
        "duplicates": table(res.duplicates[dup_cols]),
        "pii_mode": rec.pii_mode,
        "pii_found": dg.MetadataValue.json(res.pii_counts),
        "pii_rows": len(res.pii),
        "pii": table(res.pii[["source_line", "row_id", "kinds", "outcome", "preview"]], QUARANTINE_PREVIEW_ROWS),
        "quality_mean": round(float(q.mean()), 4) if q is not None else 0.0,
        "quality_below_1": int((q < 1).sum()) if q is not None else 0,
        "drift": dg.MetadataValue.json(rec.drift.as_dict() if rec.drift else {}),
        "seconds": dg.MetadataValue.json({k: round(v, 3) for k, v in res.timings.items()}),
        "dagster/row_count": len(res.kept),
        "path": dg.MetadataValue.path(str(kept_path)),
        "used_for_training": rec.used_for_training,
    }


def drop_checks(rec: DropRecord) -> list[dg.AssetCheckResult]:
    """The gates of one drop: nothing lost, rejection rate, chat schema (blocking), and the drift warning."""
    res, limit = rec.result, rec.max_rejection_rate
    counts = {"rows_in": res.rows_in, "kept": len(res.kept), "quarantined": res.quarantined}
    reject_msg = (
        f"{res.rejection_rate:.1%} of rows quarantined > {limit:.1%}: inspect the quarantine table, fix the file, "
        "or raise cleaning.max_rejection_rate" + (f". {res.notes[0]}" if res.notes and res.rows_in == 1 else "")
    )
    d = rec.drift
    drift_msg = None
    if d is not None and rec.drift_warns:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in d.components.items())
        drift_msg = f"drift score {d.score:.3f} >= drift.warn_threshold {rec.drift_warn_threshold}: this drop differs from the training data ({parts})"
    return [
        dg.AssetCheckResult(
            check_name="rows_accounted",
            passed=res.accounted(),
            metadata={**counts, "deduplicated": len(res.duplicates)},
        ),
        dg.AssetCheckResult(
            check_name="rejection_rate",
            passed=rec.rejection_ok,
            metadata={
                "rejection_rate": res.rejection_rate,
                "limit": limit,
                "reasons": dg.MetadataValue.json(res.reasons),
            },
            description=None if rec.rejection_ok else reject_msg,
        ),
        dg.AssetCheckResult(
            check_name="chat_schema",
            passed=not rec.schema_problems,
            metadata={"problems": dg.MetadataValue.json(rec.schema_problems[:20])},
        ),
        dg.AssetCheckResult(
            check_name="drift",
            passed=not rec.drift_warns,
            severity=dg.AssetCheckSeverity.WARN,
            metadata=d.as_dict() if d is not None else {},
            description=drift_msg if d is not None else "no training split yet: nothing to compare with",
        ),
    ]


def dataset_splits_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "dataset_splits")
    checks = {
        "no_split_overlap": "No row (by content or id) is in two splits.",
        "no_test_leak": "No test row is an exact or near duplicate (dedup.near_threshold) of a train row.",
        "rows_accounted": "Every cleaned row is in a split, a cross-drop duplicate or the conflict quarantine.",
    }

    @dg.asset(
        key=k,
        deps=[key(spec, "cleaned_dataset")],
        group_name=spec.name,
        code_version=code_version("finetune_pipeline.stages.splits"),
        kinds={"pandas", "parquet"},
        check_specs=[dg.AssetCheckSpec(n, asset=k, blocking=True, description=d) for n, d in checks.items()]
        + [dg.AssetCheckSpec("label_conflicts", asset=k, description=CONFLICTS_CHECK)],
    )
    def dataset_splits(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        """All cleaned drops combined and deduplicated across drops, split into train/validation/test by row id."""
        layout = state.pipeline(spec.name)
        registered = context.instance.get_dynamic_partitions(drops_partitions(spec).name)
        rec = build_dataset_splits(layout, spec, registered, log=logger(context))
        m, frames = rec.manifest, rec.result.frames
        return dg.MaterializeResult(
            metadata={
                **{f"{s}_rows": m.counts[s] for s in SPLITS},
                **{f"{s}_digest": m.digests[s] for s in SPLITS},
                "drops": dg.MetadataValue.json(m.drops),
                "drops_left_out": dg.MetadataValue.json(rec.drops_left_out),
                "cross_drop_duplicates": len(rec.result.cross_drop_duplicates),
                "cross_drop_near_duplicates": rec.near_cross_drop,
                "split_method": spec.split.method,
                "label_mix": dg.MetadataValue.json(rec.label_mix()),
                "overlap": dg.MetadataValue.json(rec.overlaps),
                "label_conflicts": len(rec.result.conflicts),
                "conflicts": table(rec.result.conflicts, QUARANTINE_PREVIEW_ROWS),
                "conflict_quarantined": len(rec.result.conflict_quarantine),
                "boilerplate_shingles": rec.result.boilerplate_shingles,
                "training_mix": table(rec.result.mix),
                "path": dg.MetadataValue.path(str(layout.splits)),
                "dagster/row_count": sum(len(frames[s]) for s in SPLITS),
            },
            data_version=dg.DataVersion(m.version),
            check_results=splits_checks(rec, spec),
        )

    return dataset_splits


CONFLICTS_CHECK = (
    "Warns when rows with equal or near-equal prompts have different answers (label conflicts, dedup.conflicts)."
)


def splits_checks(rec: SplitsRecord, spec: LoadedSpec) -> list[dg.AssetCheckResult]:
    leaks, conf = rec.result.leaks, rec.result.conflicts
    policy = spec.dedup.conflicts
    return [
        dg.AssetCheckResult(
            check_name="rows_accounted",
            passed=rec.accounted,
            metadata={
                "rows_in": rec.result.rows_in,
                "in_splits": sum(rec.manifest.counts.values()),
                "cross_drop_duplicates": len(rec.result.cross_drop_duplicates),
                "conflict_quarantined": len(rec.result.conflict_quarantine),
            },
        ),
        dg.AssetCheckResult(
            check_name="label_conflicts",
            passed=conf.empty,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"count": len(conf), "share": round(rec.result.conflict_share, 4), "policy": policy},
            description=None
            if conf.empty
            else f"{len(conf)} rows ({rec.result.conflict_share:.1%} of rows involved) have the same or a near-same "
            f"prompt as another row with a different answer (dedup.conflicts={policy}): see the conflicts table; fix "
            "the labels, or set dedup.conflicts to keep_first or quarantine",
        ),
        dg.AssetCheckResult(check_name="no_split_overlap", passed=rec.exact_overlap == 0, metadata=dict(rec.overlaps)),
        dg.AssetCheckResult(
            check_name="no_test_leak",
            passed=rec.no_test_leak,
            metadata={
                "exact": rec.overlaps["train_test_content_overlap"],
                "near": len(leaks),
                "threshold": spec.dedup.near_threshold,
                "pairs": table(leaks),
            },
            description=None
            if leaks.empty
            else f"{len(leaks)} test rows are near-duplicates of train rows: enable dedup.near "
            "or lower dedup.near_threshold",
        ),
    ]


def token_stats_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "token_stats")
    max_len = spec.training.max_length

    @dg.asset(
        key=k,
        deps=[key(spec, "dataset_splits"), key(spec, "base_model")],
        group_name=spec.name,
        code_version=code_version("finetune_pipeline.stages.splits"),
        kinds={"pandas"},
        check_specs=[
            dg.AssetCheckSpec(
                "few_truncated",
                asset=k,
                description="At most 5% of training rows are longer than training.max_length (they get truncated).",
            ),
            dg.AssetCheckSpec(
                "end_of_turn_contract",
                asset=k,
                blocking=True,
                description="Tokenised as training will tokenise them, every training row trains its assistant "
                "turns through the end-of-turn token and none is all-masked (else the model never learns to stop).",
            ),
        ],
    )
    def token_stats_(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        """Token-length distribution of each split (base model tokenizer, chat template applied) against training.max_length: how many rows would be truncated."""
        ts = token_stats(state.pipeline(spec.name), spec)
        share = ts.share_over_max_length
        eot = end_of_turn_check(state.pipeline(spec.name), spec)
        context.log.info(f"token lengths: {ts.stats}; end-of-turn check: {eot.message}")
        return dg.MaterializeResult(
            metadata={
                **{f"{s}_tokens": dg.MetadataValue.json(ts.stats[s]) for s in SPLITS},
                "train_over_max_length": ts.stats["train"].get("over_max_length", 0),
                "max_length": max_len,
                "histogram": png_markdown(ts.histogram, "token lengths"),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name="few_truncated",
                    passed=share <= 0.05,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"share_over_max_length": share},
                    description=None
                    if share <= 0.05
                    else f"{share:.1%} of training rows exceed training.max_length={max_len}: raise it or set "
                    "cleaning.max_tokens",
                ),
                dg.AssetCheckResult(
                    check_name="end_of_turn_contract",
                    passed=eot.passed,
                    metadata=eot.metadata,
                    description=None if eot.passed else eot.message,
                ),
            ],
        )

    return token_stats_


READINESS_CHECKS = {
    "spec_minimums": ("The splits meet split.min_train_rows / split.min_test_rows (training waits otherwise).", True),
    "enough_train_rows": ("At least 100 training rows (the guides: under 100 is too few to fine-tune).", False),
    "test_resolves_gate": ("The evaluated test rows can resolve the promotion gate's margin.", False),
    "label_balance": ("Largest / smallest label count in train is at most 10.", False),
    "budget_covers_an_epoch": (
        "training.max_minutes buys at least one pass over the training rows at the last measured pace.",
        False,
    ),
}


def data_readiness_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "data_readiness")

    @dg.asset(
        key=k,
        deps=[key(spec, "dataset_splits"), key(spec, "token_stats")],
        group_name=spec.name,
        code_version=code_version("finetune_pipeline.stages.data_readiness"),
        kinds={"pandas"},
        check_specs=[
            dg.AssetCheckSpec(n, asset=k, description=d, blocking=b) for n, (d, b) in READINESS_CHECKS.items()
        ],
    )
    def data_readiness_(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        """Is the data ready to fine-tune on? Rows per split against the guides' minimums, whether the test split can resolve the gate's margin, label balance, token budget and estimated time, and a verdict (fine-tune / collect more data / few-shot may be enough)."""
        r = data_readiness(state.pipeline(spec.name), spec)
        context.log.info(f"data readiness: {r.verdict}; " + "; ".join(r.reasons))
        warn = dg.AssetCheckSeverity.WARN
        checks = [
            ("spec_minimums", not r.blocking, None, "; ".join(r.blocking) or None),
            ("enough_train_rows", r.enough_train_rows, warn, r.reasons[0] if not r.enough_train_rows else None),
            ("test_resolves_gate", r.test_resolves_gate, warn, next((x for x in r.reasons if "test rows" in x), None)),
            ("label_balance", r.labels_balanced, warn, next((x for x in r.reasons if "labels" in x), None)),
            ("budget_covers_an_epoch", r.budget_covers_an_epoch, warn, r.budget_warning),
        ]
        return dg.MaterializeResult(
            metadata={
                "verdict": r.verdict,
                "readiness": dg.MetadataValue.json(r.as_dict()),
                "detectable_difference": round(r.detectable, 4),
                "rows_for_margin": r.rows_for_margin,
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=name,
                    passed=ok,
                    severity=sev or dg.AssetCheckSeverity.ERROR,
                    metadata={"verdict": r.verdict},
                    description=None if ok else msg,
                )
                for name, ok, sev, msg in checks
            ],
        )

    return data_readiness_


def build_data_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    return [
        raw_dataset_asset(spec),
        cleaned_dataset_asset(spec),
        dataset_splits_asset(spec),
        token_stats_asset(spec),
        data_readiness_asset(spec),
    ]
