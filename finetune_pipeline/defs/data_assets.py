"""Data assets: raw_dataset and cleaned_dataset per drop, dataset_splits over all drops, token_stats."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd

from finetune_pipeline.data.clean import clean_file, frame_digest, schema_problems, write_parquet_atomic
from finetune_pipeline.data.drift import drift
from finetune_pipeline.data.drops import file_digest, find_drop
from finetune_pipeline.data.split import SPLITS, build_splits, overlap_report
from finetune_pipeline.defs.common import CODE_VERSION, drops_partitions, key, png_markdown, table
from finetune_pipeline.defs.resources import StateStore
from finetune_pipeline.spec import LoadedSpec

QUARANTINE_PREVIEW_ROWS = 200


def raw_paths(state: StateStore, spec: LoadedSpec, drop: str, suffix: str | None = None) -> dict[str, Path]:
    """Where a drop's files live. The raw copy keeps the dropped file's extension (it tells the format)."""
    d = state.pipeline_dir(spec.name)
    if suffix is None:
        found = sorted((d / "raw").glob(f"{drop}.*")) if (d / "raw").exists() else []
        found = [f for f in found if not f.name.endswith(".tmp")]
        suffix = "".join(found[0].suffixes) if found else ".jsonl"
    return {
        "raw": d / "raw" / f"{drop}{suffix}",
        "kept": d / "cleaned" / f"{drop}.parquet",
        "quarantine": d / "quarantine" / f"{drop}.parquet",
        "duplicates": d / "duplicates" / f"{drop}.parquet",
        "drift": d / "drift" / f"{drop}.json",
    }


def token_counter(state: StateStore, spec: LoadedSpec):  # type: ignore[no-untyped-def]
    from finetune_pipeline.data.tokens import counter_for

    return counter_for(spec.spec.model.base, spec.base_dir, state.models_dir(), spec.spec.model.trust_remote_code)


def usable_drops(state: StateStore, spec: LoadedSpec, registered: list[str]) -> list[str]:
    """Registered drops (in the order they arrived) whose cleaned rows passed their gates: what training uses."""
    return [d for d in registered if raw_paths(state, spec, d)["kept"].exists()]


def dropped_name(context: dg.AssetExecutionContext, raw_key: dg.AssetKey) -> str | None:
    """The file the user dropped (run tag of the sensor's run, else raw_dataset's source_file metadata)."""
    tag = context.run.tags.get("finetune/source_file")
    if tag:
        return tag
    filt = dg.AssetRecordsFilter(asset_key=raw_key, asset_partitions=[context.partition_key])
    for rec in context.instance.fetch_materializations(filt, limit=1).records:
        mat = rec.asset_materialization
        v = mat.metadata.get("source_file") if mat is not None else None
        if v is not None:
            return str(v.value)
    return None


def build_data_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    parts = drops_partitions(spec)
    src = spec.spec.source
    raw_key, cleaned_key, splits_key = (
        key(spec, "raw_dataset"),
        key(spec, "cleaned_dataset"),
        key(spec, "dataset_splits"),
    )

    @dg.asset(
        key=raw_key,
        group_name=spec.name,
        partitions_def=parts,
        code_version=CODE_VERSION,
        kinds={"file"},
        description="One dropped data file, copied byte for byte into the state root (partition = content hash).",
    )
    def raw_dataset(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        drop = context.partition_key
        cfg_path = context.run.tags.get("finetune/source_file")
        source = (
            Path(cfg_path)
            if cfg_path and Path(cfg_path).exists()
            else find_drop(spec.incoming_dir, src.file_glob, drop)
        )
        dest = raw_paths(state, spec, drop, suffix="".join(source.suffixes[-1:]) or ".jsonl")["raw"]
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
        context.log.info(f"copied {source} ({len(data):,} bytes) to {dest}")
        return dg.MaterializeResult(
            metadata={
                "source_file": dg.MetadataValue.path(str(source)),
                "stored_at": dg.MetadataValue.path(str(dest)),
                "bytes": len(data),
                "lines": data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1),
                "sha256": digest,
            },
            data_version=dg.DataVersion(drop),
        )

    @dg.asset(
        key=cleaned_key,
        deps=[raw_key],
        group_name=spec.name,
        partitions_def=parts,
        code_version=CODE_VERSION,
        kinds={"pandas", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                "rows_accounted",
                asset=cleaned_key,
                blocking=True,
                description="rows_in = kept + quarantined + deduplicated: nothing is lost.",
            ),
            dg.AssetCheckSpec(
                "rejection_rate",
                asset=cleaned_key,
                blocking=True,
                description="Share of quarantined rows is within cleaning.max_rejection_rate.",
            ),
            dg.AssetCheckSpec(
                "chat_schema",
                asset=cleaned_key,
                blocking=True,
                description="Every kept row is a chat with a user turn and a final non-empty assistant turn.",
            ),
            dg.AssetCheckSpec(
                "drift",
                asset=cleaned_key,
                description="Warns when the drop drifts from the current training split (drift.warn_threshold).",
            ),
        ],
        description="One drop in any supported format, normalised to the chat schema, validated, quality-scored and "
        "deduplicated (exact and near); bad rows quarantined with their reason and line.",
    )
    def cleaned_dataset(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        drop = context.partition_key
        p = raw_paths(state, spec, drop)
        if not p["raw"].exists():
            raise FileNotFoundError(
                f"raw_dataset for drop {drop} is missing at {p['raw']}: materialize raw_dataset first"
            )
        c = spec.spec.cleaning
        counter = token_counter(state, spec) if (c.min_tokens is not None or c.max_tokens is not None) else None
        res = clean_file(p["raw"], drop, spec.spec, count_tokens=counter, source_name=dropped_name(context, raw_key))
        write_parquet_atomic(res.quarantine, p["quarantine"])
        write_parquet_atomic(res.duplicates, p["duplicates"])
        for note in res.notes:
            context.log.info(f"{p['raw'].name}: {note}")
        context.log.info(
            f"{res.rows_in} rows in ({res.file_format}, {res.record_format}): {len(res.kept)} kept, "
            f"{len(res.quarantine)} quarantined {res.reasons}, {len(res.duplicates) - res.near_duplicates} exact "
            f"and {res.near_duplicates} near duplicates"
        )
        limit = c.max_rejection_rate
        schema = schema_problems(res.kept, text_only=res.record_format == "text")
        gates_ok = res.accounted() and res.rejection_rate <= limit and not schema
        if gates_ok:
            write_parquet_atomic(res.kept, p["kept"])  # only a drop that passed its gates is used for training
        else:
            p["kept"].unlink(missing_ok=True)
            context.log.warning(f"drop {drop} failed its quality gates: it is left out of dataset_splits")
        train_path = state.pipeline_dir(spec.name) / "splits" / "train.parquet"
        drift_meta: dict = {}
        drift_check = dg.AssetCheckResult(
            check_name="drift", passed=True, description="no training split yet: nothing to compare with"
        )
        if spec.spec.drift.enabled and train_path.exists() and len(res.kept):
            rep = drift(res.kept, pd.read_parquet(train_path))
            drift_meta = rep.as_dict()
            p["drift"].parent.mkdir(parents=True, exist_ok=True)
            p["drift"].write_text(json.dumps(drift_meta, indent=2))
            warn = rep.score >= spec.spec.drift.warn_threshold
            drift_check = dg.AssetCheckResult(
                check_name="drift",
                passed=not warn,
                severity=dg.AssetCheckSeverity.WARN,
                metadata={k: v for k, v in drift_meta.items()},
                description=(
                    f"drift score {rep.score:.3f} >= drift.warn_threshold {spec.spec.drift.warn_threshold}: "
                    f"this drop differs from the training data ({', '.join(f'{k} {v:.2f}' for k, v in rep.components.items())})"
                )
                if warn
                else None,
            )
        q = res.kept["quality"].astype(float) if len(res.kept) else pd.Series([], dtype=float)
        return dg.MaterializeResult(
            metadata={
                "rows_in": res.rows_in,
                "kept": len(res.kept),
                "quarantined": len(res.quarantine),
                "deduplicated": len(res.duplicates),
                "exact_duplicates": len(res.duplicates) - res.near_duplicates,
                "near_duplicates": res.near_duplicates,
                "blank_lines": res.blank_lines,
                "file_format": res.file_format,
                "record_format": res.record_format,
                "notes": dg.MetadataValue.json(res.notes),
                "rejection_rate": round(res.rejection_rate, 4),
                "rejection_reasons": dg.MetadataValue.json(res.reasons),
                "quarantine": table(
                    res.quarantine[["source_line", "reason", "detail", "raw"]], QUARANTINE_PREVIEW_ROWS
                ),
                "quarantine_file": dg.MetadataValue.path(str(p["quarantine"])),
                "duplicates": table(res.duplicates[["source_line", "row_id", "duplicate_of", "kind", "similarity"]]),
                "quality_mean": round(float(q.mean()), 4) if len(q) else 0.0,
                "quality_below_1": int((q < 1).sum()),
                "drift": dg.MetadataValue.json(drift_meta),
                "seconds": dg.MetadataValue.json({k: round(v, 3) for k, v in res.timings.items()}),
                "dagster/row_count": len(res.kept),
                "path": dg.MetadataValue.path(str(p["kept"])),
                "used_for_training": gates_ok,
            },
            data_version=dg.DataVersion(frame_digest(res.kept, ["row_id", "content_hash"])),
            check_results=[
                dg.AssetCheckResult(
                    check_name="rows_accounted",
                    passed=res.accounted(),
                    metadata={
                        "rows_in": res.rows_in,
                        "kept": len(res.kept),
                        "quarantined": len(res.quarantine),
                        "deduplicated": len(res.duplicates),
                    },
                ),
                dg.AssetCheckResult(
                    check_name="rejection_rate",
                    passed=res.rejection_rate <= limit,
                    metadata={
                        "rejection_rate": res.rejection_rate,
                        "limit": limit,
                        "reasons": dg.MetadataValue.json(res.reasons),
                    },
                    description=None
                    if res.rejection_rate <= limit
                    else f"{res.rejection_rate:.1%} of rows quarantined > {limit:.1%}: inspect the quarantine "
                    f"table, fix the file, or raise cleaning.max_rejection_rate"
                    + (f". {res.notes[0]}" if res.notes and res.rows_in == 1 else ""),
                ),
                dg.AssetCheckResult(
                    check_name="chat_schema",
                    passed=not schema,
                    metadata={"problems": dg.MetadataValue.json(schema[:20])},
                ),
                drift_check,
            ],
        )

    @dg.asset(
        key=splits_key,
        deps=[cleaned_key],
        group_name=spec.name,
        code_version=CODE_VERSION,
        kinds={"pandas", "parquet"},
        check_specs=[
            dg.AssetCheckSpec(
                "no_split_overlap",
                asset=splits_key,
                blocking=True,
                description="No row (by content or id) is in two splits.",
            ),
            dg.AssetCheckSpec(
                "no_test_leak",
                asset=splits_key,
                blocking=True,
                description="No test row is an exact or near duplicate (dedup.near_threshold) of a train row.",
            ),
        ],
        description="All cleaned drops combined and deduplicated across drops, split into train/validation/test by row id.",
    )
    def dataset_splits(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        registered = context.instance.get_dynamic_partitions(parts.name)
        drops = usable_drops(state, spec, registered)
        frames = [pd.read_parquet(raw_paths(state, spec, d)["kept"]) for d in drops]
        missing = [d for d in registered if d not in drops]
        if missing:
            context.log.warning(f"drops not cleaned yet or blocked by their gates (left out): {missing}")
        res = build_splits(frames, spec.spec.split, drops, spec.spec.dedup)
        if res.frames["train"].empty:
            raise ValueError(
                f"the train split is empty ({sum(len(f) for f in res.frames.values())} rows in all): "
                "add data or lower split.validation_fraction / split.test_fraction"
            )
        out = state.pipeline_dir(spec.name) / "splits"
        out.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            write_parquet_atomic(res.frames[s], out / f"{s}.parquet")
        write_parquet_atomic(res.cross_drop_duplicates, out / "cross_drop_duplicates.parquet")
        overlaps = overlap_report(res.frames)
        manifest = {
            "drops": res.drops,
            "digests": res.digests,
            "version": res.combined_digest,
            "counts": {s: len(res.frames[s]) for s in SPLITS},
            "spec_hash": spec.spec_hash,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        exact = sum(v for k, v in overlaps.items() if k.endswith(("_content_overlap", "_id_overlap")))
        write_parquet_atomic(res.leaks, out / "test_train_leaks.parquet")
        near_cross = int((res.cross_drop_duplicates["kind"] == "near").sum())
        context.log.info(
            f"splits {manifest['counts']} from {len(res.drops)} drop(s); "
            f"{len(res.cross_drop_duplicates)} cross-drop duplicates removed ({near_cross} near)"
        )
        return dg.MaterializeResult(
            metadata={
                **{f"{s}_rows": len(res.frames[s]) for s in SPLITS},
                **{f"{s}_digest": res.digests[s] for s in SPLITS},
                "drops": dg.MetadataValue.json(res.drops),
                "drops_left_out": dg.MetadataValue.json(missing),
                "cross_drop_duplicates": len(res.cross_drop_duplicates),
                "cross_drop_near_duplicates": near_cross,
                "split_method": spec.spec.split.method,
                "label_mix": dg.MetadataValue.json(_label_mix(res.frames)),
                "overlap": dg.MetadataValue.json(overlaps),
                "path": dg.MetadataValue.path(str(out)),
                "dagster/row_count": sum(len(res.frames[s]) for s in SPLITS),
            },
            data_version=dg.DataVersion(res.combined_digest),
            check_results=[
                dg.AssetCheckResult(
                    check_name="no_split_overlap", passed=exact == 0, metadata={k: v for k, v in overlaps.items()}
                ),
                dg.AssetCheckResult(
                    check_name="no_test_leak",
                    passed=overlaps["train_test_content_overlap"] == 0 and res.leaks.empty,
                    metadata={
                        "exact": overlaps["train_test_content_overlap"],
                        "near": len(res.leaks),
                        "threshold": spec.spec.dedup.near_threshold,
                        "pairs": table(res.leaks),
                    },
                    description=None
                    if res.leaks.empty
                    else f"{len(res.leaks)} test rows are near-duplicates of train rows: enable dedup.near "
                    "or lower dedup.near_threshold",
                ),
            ],
        )

    tokens_key = key(spec, "token_stats")

    @dg.asset(
        key=tokens_key,
        deps=[splits_key, key(spec, "base_model")],
        group_name=spec.name,
        code_version=CODE_VERSION,
        kinds={"pandas"},
        check_specs=[
            dg.AssetCheckSpec(
                "few_truncated",
                asset=tokens_key,
                description="At most 5% of training rows are longer than training.max_length (they get truncated).",
            )
        ],
        description="Token-length distribution of each split (base model tokenizer, chat template applied) against "
        "training.max_length: how many rows would be truncated.",
    )
    def token_stats(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from finetune_pipeline.data.tokens import length_stats

        counter = token_counter(state, spec)
        max_len = spec.spec.training.max_length
        out = state.pipeline_dir(spec.name) / "splits"
        stats, lengths = {}, {}
        for s in SPLITS:
            f = pd.read_parquet(out / f"{s}.parquet", columns=["messages"])
            lengths[s] = counter(f["messages"].tolist())
            stats[s] = length_stats(lengths[s], max_len)
        fig, ax = plt.subplots(figsize=(7, 3.2))
        hi = max(max_len, *(int(v.max()) for v in lengths.values() if len(v))) + 1
        bins = list(range(0, hi + 8, max(1, hi // 60)))
        for s in SPLITS:
            if len(lengths[s]):
                ax.hist(lengths[s], bins=bins, alpha=0.6, label=f"{s} ({len(lengths[s])})")
        ax.axvline(max_len, color="red", linestyle="--", label=f"max_length {max_len}")
        ax.set_xlabel("tokens per row (chat template applied)")
        ax.set_ylabel("rows")
        ax.legend()
        plot = png_markdown(fig, "token lengths")
        plt.close(fig)
        share = stats["train"].get("over_max_length_share", 0.0)
        (out / "token_stats.json").write_text(json.dumps(stats, indent=2))
        context.log.info(f"token lengths: {stats}")
        return dg.MaterializeResult(
            metadata={
                **{f"{s}_tokens": dg.MetadataValue.json(stats[s]) for s in SPLITS},
                "train_over_max_length": stats["train"].get("over_max_length", 0),
                "max_length": max_len,
                "histogram": plot,
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
                )
            ],
        )

    return [raw_dataset, cleaned_dataset, dataset_splits, token_stats]


def _label_mix(frames: dict[str, pd.DataFrame]) -> dict[str, dict[str, int]]:
    if not any("label" in f and f["label"].notna().any() for f in frames.values()):
        return {}
    return {s: {str(k): int(v) for k, v in f["label"].value_counts().items()} for s, f in frames.items()}
