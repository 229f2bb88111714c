"""Small helpers shared by the asset shells: keys, partitions, lineage, logging, metadata values, the Pipes launch."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import dagster as dg
import pandas as pd

from finetune_pipeline.keys import code_version
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.tracking.mlflow_store import Lineage
from finetune_pipeline.tracking.tracker import Tracker
from finetune_pipeline.training.launch import ChildLaunch


def key(spec: LoadedSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def drops_partitions_name(pipeline: str) -> str:
    """The name of a pipeline's dynamic partitions, one per dropped file (the assets, the sensor and the CLI)."""
    return f"{pipeline}_drops"


def drops_partitions(spec: LoadedSpec) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=drops_partitions_name(spec.name))


def lineage(context: dg.AssetExecutionContext, spec: LoadedSpec, *stage: str) -> Lineage:
    """Who produced an MLflow run: the Dagster run, asset, partition, the stage's code version and the spec."""
    return Lineage(
        pipeline=spec.name,
        asset=context.asset_key.to_user_string(),
        dagster_run_id=context.run_id,
        partition=context.partition_key if context.has_partition_key else None,
        code_version=code_version(*stage),
        spec_hash=spec.spec_hash,
    )


def logger(context: dg.AssetExecutionContext) -> Callable[[str], None]:
    """Progress lines go into the Dagster run's event log as they happen."""
    return lambda msg: context.log.info(msg)


def pipes_launch(context: dg.AssetExecutionContext) -> Callable[[ChildLaunch], dict[str, Any]]:
    """Runs the training child through Dagster Pipes (its logs stream into the run) and returns what it reported:
    a local subprocess, or a Kubernetes pod through dagster-k8s' Pipes client (``runtime.launcher: k8s``)."""

    def launch(how: ChildLaunch) -> dict[str, Any]:
        if how.k8s is not None:
            from dagster_k8s import PipesK8sClient

            run = PipesK8sClient().run(context=context, extras=how.extras, command=how.command, **how.k8s)
        else:
            client = dg.PipesSubprocessClient(env={"PYTHONUNBUFFERED": "1", **(how.env or {})})
            run = client.run(command=how.command, context=context, extras=how.extras)
        reported = run.get_materialize_result()
        return {k: getattr(v, "value", v) for k, v in (reported.metadata or {}).items()}

    return launch


def latest_version(context: dg.AssetExecutionContext, asset_key: dg.AssetKey) -> str:
    """Data version of the latest materialization of an upstream asset (it names the record to read)."""
    ev = context.instance.get_latest_materialization_event(asset_key)
    mat = ev.asset_materialization if ev is not None else None
    if mat is None:
        raise FileNotFoundError(f"{asset_key.to_user_string()} has not been materialized yet")
    version = (mat.tags or {}).get("dagster/data_version")
    if not version:
        raise ValueError(f"{asset_key.to_user_string()} has no data version")
    return version


def table(df: pd.DataFrame, limit: int = 25) -> dg.TableMetadataValue:
    """A DataFrame preview as a Dagster table (strings truncated for the UI)."""
    head = df.head(limit)
    cols = [dg.TableColumn(str(c), "string" if head[c].dtype == object else str(head[c].dtype)) for c in head.columns]
    recs = [
        dg.TableRecord(
            {
                str(c): (str(v)[:300] if isinstance(v, str) else (v.item() if hasattr(v, "item") else v))
                for c, v in r.items()
            }
        )
        for r in head.to_dict(orient="records")
    ]
    return dg.MetadataValue.table(records=recs, schema=dg.TableSchema(columns=cols))


def png_markdown(png: bytes, alt: str) -> dg.MarkdownMetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def mlflow_link(tracker: Tracker, run_id: str) -> dict[str, Any]:
    return {"mlflow_run_id": run_id, "mlflow_run": dg.MetadataValue.url(tracker.run_url(run_id))}
