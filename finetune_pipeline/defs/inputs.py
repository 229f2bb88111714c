"""What the model-side asset shells read: splits, the provisioned base model, upstream data versions."""

import hashlib
import json
from typing import Any

import dagster as dg
import pandas as pd

from finetune_pipeline.data.split import SPLITS
from finetune_pipeline.defs.resources import StateStore
from finetune_pipeline.spec import LoadedSpec


def content_key(*parts: Any) -> str:
    """Short stable hash of JSON-able parts: names cached results (adapter, eval) by what they depend on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_splits(state: StateStore, spec: LoadedSpec) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    d = state.pipeline_dir(spec.name) / "splits"
    if not (d / "manifest.json").exists():
        raise FileNotFoundError(f"no dataset splits at {d}: materialize {spec.name}/dataset_splits first")
    return {s: pd.read_parquet(d / f"{s}.parquet") for s in SPLITS}, json.loads((d / "manifest.json").read_text())


def read_base(state: StateStore, spec: LoadedSpec) -> dict[str, Any]:
    f = state.pipeline_dir(spec.name) / "base_model.json"
    if not f.exists():
        raise FileNotFoundError(f"materialize {spec.name}/base_model first")
    return json.loads(f.read_text())


def log_splits(
    state: StateStore, frames: dict[str, pd.DataFrame], manifest: dict[str, Any], spec: LoadedSpec, which: list[str]
) -> None:
    """log_input for each split read, with the split's digest (the same as in dataset_splits' metadata)."""
    from finetune_pipeline.tracking import mlflow_store

    folder = state.pipeline_dir(spec.name) / "splits"
    for s in which:
        mlflow_store.log_dataset(
            frames[s][["row_id", "drop", "source_line", "content_hash"]],
            name=f"{spec.name}/dataset_splits/{s}",
            digest=manifest["digests"][s],
            source=str(folder / f"{s}.parquet"),
            context={"train": "training", "validation": "validation", "test": "evaluation"}[s],
        )


def latest_version(context: dg.AssetExecutionContext, asset_key: dg.AssetKey) -> str:
    """Data version of the latest materialization of an upstream asset (it names the folder to read)."""
    ev = context.instance.get_latest_materialization_event(asset_key)
    mat = ev.asset_materialization if ev is not None else None
    if mat is None:
        raise FileNotFoundError(f"{asset_key.to_user_string()} has not been materialized yet")
    version = (mat.tags or {}).get("dagster/data_version")
    if not version:
        raise ValueError(f"{asset_key.to_user_string()} has no data version")
    return version
