"""Data assets: raw_dataset and cleaned_dataset per drop, dataset_splits over all drops."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd

from finetune_pipeline.data.clean import clean_file, frame_digest, schema_problems, write_parquet_atomic
from finetune_pipeline.data.drops import file_digest, find_drop
from finetune_pipeline.data.split import SPLITS, build_splits, overlap_report
from finetune_pipeline.defs.common import CODE_VERSION, drops_partitions, key, table
from finetune_pipeline.defs.resources import StateStore
from finetune_pipeline.spec import LoadedSpec


def raw_paths(state: StateStore, spec: LoadedSpec, drop: str) -> dict[str, Path]:
    d = state.pipeline_dir(spec.name)
    return {
        "raw": d / "raw" / f"{drop}.jsonl",
        "kept": d / "cleaned" / f"{drop}.parquet",
        "quarantine": d / "quarantine" / f"{drop}.parquet",
        "duplicates": d / "duplicates" / f"{drop}.parquet",
    }


def usable_drops(state: StateStore, spec: LoadedSpec, registered: list[str]) -> list[str]:
    """Registered drops (in the order they arrived) whose cleaned rows passed their gates: what training uses."""
    return [d for d in registered if raw_paths(state, spec, d)["kept"].exists()]


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
        dest = raw_paths(state, spec, drop)["raw"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
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
        ],
        description="One drop normalised to the chat schema, validated and exact-deduplicated; bad rows quarantined with their reason.",
    )
    def cleaned_dataset(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        drop = context.partition_key
        p = raw_paths(state, spec, drop)
        if not p["raw"].exists():
            raise FileNotFoundError(
                f"raw_dataset for drop {drop} is missing at {p['raw']}: materialize raw_dataset first"
            )
        res = clean_file(p["raw"], drop, src, spec.spec.cleaning)
        write_parquet_atomic(res.quarantine, p["quarantine"])
        write_parquet_atomic(res.duplicates, p["duplicates"])
        context.log.info(
            f"{res.rows_in} rows in: {len(res.kept)} kept, {len(res.quarantine)} quarantined {res.reasons}, "
            f"{len(res.duplicates)} exact duplicates"
        )
        limit = spec.spec.cleaning.max_rejection_rate
        schema = schema_problems(res.kept)
        gates_ok = res.accounted() and res.rejection_rate <= limit and not schema
        if gates_ok:
            write_parquet_atomic(res.kept, p["kept"])  # only a drop that passed its gates is used for training
        else:
            p["kept"].unlink(missing_ok=True)
            context.log.warning(f"drop {drop} failed its quality gates: it is left out of dataset_splits")
        return dg.MaterializeResult(
            metadata={
                "rows_in": res.rows_in,
                "kept": len(res.kept),
                "quarantined": len(res.quarantine),
                "deduplicated": len(res.duplicates),
                "blank_lines": res.blank_lines,
                "rejection_rate": round(res.rejection_rate, 4),
                "rejection_reasons": dg.MetadataValue.json(res.reasons),
                "quarantine": table(res.quarantine[["source_line", "reason", "detail", "raw"]]),
                "quarantine_file": dg.MetadataValue.path(str(p["quarantine"])),
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
                    "table, fix the file, or raise cleaning.max_rejection_rate",
                ),
                dg.AssetCheckResult(
                    check_name="chat_schema",
                    passed=not schema,
                    metadata={"problems": dg.MetadataValue.json(schema[:20])},
                ),
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
        res = build_splits(frames, spec.spec.split, drops)
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
        context.log.info(
            f"splits {manifest['counts']} from {len(res.drops)} drop(s); "
            f"{len(res.cross_drop_duplicates)} cross-drop duplicates removed"
        )
        return dg.MaterializeResult(
            metadata={
                **{f"{s}_rows": len(res.frames[s]) for s in SPLITS},
                **{f"{s}_digest": res.digests[s] for s in SPLITS},
                "drops": dg.MetadataValue.json(res.drops),
                "drops_left_out": dg.MetadataValue.json(missing),
                "cross_drop_duplicates": len(res.cross_drop_duplicates),
                "overlap": dg.MetadataValue.json(overlaps),
                "path": dg.MetadataValue.path(str(out)),
                "dagster/row_count": sum(len(res.frames[s]) for s in SPLITS),
            },
            data_version=dg.DataVersion(res.combined_digest),
            check_results=[
                dg.AssetCheckResult(
                    check_name="no_split_overlap", passed=exact == 0, metadata={k: v for k, v in overlaps.items()}
                ),
            ],
        )

    return [raw_dataset, cleaned_dataset, dataset_splits]
