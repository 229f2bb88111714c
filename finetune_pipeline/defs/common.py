"""Small helpers shared by the asset shells."""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from finetune_pipeline import __version__
from finetune_pipeline.spec import LoadedSpec


def _source_hash() -> str:
    """Hash of the package's Python source: a code change invalidates cached sweeps, adapters and evaluations."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


CODE_VERSION = f"{__version__}+{_source_hash()}"


def key(spec: LoadedSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def drops_partitions(spec: LoadedSpec) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec.name}_drops")


def lineage(context: dg.AssetExecutionContext, spec: LoadedSpec) -> Any:
    from finetune_pipeline.tracking.mlflow_store import Lineage

    return Lineage(
        pipeline=spec.name,
        asset=context.asset_key.to_user_string(),
        dagster_run_id=context.run_id,
        partition=context.partition_key if context.has_partition_key else None,
        code_version=CODE_VERSION,
        spec_hash=spec.spec_hash,
    )


def logger(context: dg.AssetExecutionContext) -> Callable[[str], None]:
    """Progress lines go into the Dagster run's event log as they happen."""
    return lambda msg: context.log.info(msg)


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


def png_markdown(fig: Any, alt: str) -> dg.MarkdownMetadataValue:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def mlflow_link(ui_url: str, experiment_id: str, run_id: str) -> dict[str, Any]:
    return {
        "mlflow_run_id": run_id,
        "mlflow_run": dg.MetadataValue.url(f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"),
    }
