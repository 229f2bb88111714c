"""Follow a registered model version back to its runs, datasets and drop files (the ``lineage`` command).

Works on both kinds of version this project has registered: the older ones, whose source run is the ``register``
run and whose links are version tags only, and MLflow 3 ones, made from a LoggedModel whose source run is the
training run and which carries its datasets and evaluation metrics itself.
"""

from __future__ import annotations

from typing import Any

from finetune_pipeline.tracking.mlflow_store import LINEAGE_RUNS, TAG_PREFIX


def _version(client: Any, model_uri: str) -> tuple[str, Any]:
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias)
    name, ver = rest.rsplit("/", 1)
    return name, client.get_model_version(name, ver)


def _run(client: Any, run_id: str) -> dict[str, Any]:
    r = client.get_run(run_id)
    return {
        "run_id": run_id,
        "name": r.info.run_name,
        "dagster_run_id": r.data.tags.get("dagster.run_id"),
        "asset": r.data.tags.get("dagster.asset_key"),
        "datasets": [
            {"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source}
            for d in (r.inputs.dataset_inputs if r.inputs else [])
        ],
    }


def _logged_model(client: Any, source: str) -> dict[str, Any] | None:
    """The LoggedModel behind a version whose source is ``models:/<model_id>``: its source run, params, and each
    metric with the dataset it was measured on."""
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else ""
    if not model_id:
        return None
    m = client.get_logged_model(model_id)
    return {
        "model_id": model_id,
        "name": m.name,
        "source_run_id": m.source_run_id,
        "status": str(m.status),
        "params": dict(m.params or {}),
        "metrics": [
            {"key": x.key, "value": x.value, "dataset": x.dataset_name, "digest": x.dataset_digest, "run_id": x.run_id}
            for x in (m.metrics or [])
        ],
        "datasets": sorted(
            {(x.dataset_name, x.dataset_digest) for x in (m.metrics or []) if x.dataset_name},
        ),
    }


def trace(client: Any, model_uri: str) -> dict[str, Any]:
    """Follow ``models:/name@alias`` (or ``/version``) back to its runs, datasets and drop files."""
    name, mv = _version(client, model_uri)
    chain: dict[str, Any] = {"model": f"{name} v{mv.version}", "version_tags": dict(mv.tags), "runs": {}}
    for key in LINEAGE_RUNS:
        rid = mv.tags.get(f"{TAG_PREFIX}{key}")
        if rid:
            chain["runs"][key] = _run(client, rid)
    if mv.run_id:
        chain["source_run"] = _run(client, mv.run_id)
    logged = _logged_model(client, mv.source or "")
    if logged is not None:
        logged["datasets"] = [{"name": n, "digest": d} for n, d in logged["datasets"]]
        chain["logged_model"] = logged
    return chain
