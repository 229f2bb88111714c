"""The model registry through an explicit ``MlflowClient``: MLflow 3 LoggedModels registered as versions, the
champion and challenger aliases, the champion history, the round-trip record.

Every function takes the client it works on (the Tracker's); none reads MLflow's process-wide URI, with one
documented exception inside MLflow itself (``_registry_sees``). mlflow is imported inside functions so that loading
the Dagster definitions stays fast.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_pipeline.tracking.mlflow_store import HISTORY_TAG, RELOAD_TAG

PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.23,<6", "accelerate>=1.15,<1.16"]
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # on a LoggedModel: the versions registered from it (the UI reads it)


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as MLflow knows it from a run's inputs: its name and digest (= the Dagster data version)."""

    name: str
    digest: str


@dataclass(frozen=True)
class MetricLink:
    """Metrics a run logged about the model, to be attached to the LoggedModel with the dataset they were measured
    on: every metric of ``run_id`` whose key starts with one of ``prefixes`` (its last point)."""

    run_id: str
    prefixes: tuple[str, ...]
    dataset: DatasetRef | None


@dataclass(frozen=True)
class ServedModel:
    """A merged chat model as MLflow models-from-code: the weights and tokenizer (saved by the caller into
    ``folder``), the serving code and the modules it imports, and the signature."""

    folder: Path
    serving_code: Path
    code_paths: list[Path]
    signature: Any


@dataclass(frozen=True)
class NewVersion:
    """What the registry made: the version, the LoggedModel behind it and the run it came from."""

    name: str
    version: str
    model_id: str
    source_run_id: str


@dataclass(frozen=True)
class Champion:
    version: str
    tags: dict[str, str] = field(default_factory=dict)


def chat_signature(max_new_tokens: int) -> Any:
    """Params only (max_new_tokens / max_tokens, temperature, seed), no input schema: MLflow then hands each request's
    structure to the model as sent (a column schema folds ``{"inputs": {"prompt": [a, b]}}`` into ONE row and drops
    unknown fields silently); the served model splits the rows itself and refuses other shapes with a 400."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import DataType, ParamSchema, ParamSpec

    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", DataType.long, max_new_tokens),
            ParamSpec("max_tokens", DataType.long, None),
            ParamSpec("temperature", DataType.double, 0.0),
            ParamSpec("seed", DataType.long, 0),
        ]
    )
    return ModelSignature(inputs=None, params=params)


def ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name, description="Fine-tuned by finetune_pipeline.")


def create_logged_model(
    client: Any, experiment_id: str, name: str, source_run_id: str, params: dict[str, Any], tags: dict[str, str]
) -> Any:
    """A LoggedModel (MLflow 3) produced by ``source_run_id``, recorded as that run's output."""
    from mlflow.entities import LoggedModelOutput

    model = client.create_logged_model(
        experiment_id,
        name=name,
        source_run_id=source_run_id,
        params={k: str(v) for k, v in params.items()},
        tags=tags,
        model_type="chat-lm",
    )
    client.log_outputs(source_run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model


def save_served_model(client: Any, model: Any, served: ServedModel, pip_requirements: list[str]) -> None:
    """Save the pyfunc chat model locally (its MLmodel names the LoggedModel) and upload it as the LoggedModel's
    artifacts; the model is then READY."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / "model"
        mlflow_model = Model(
            artifact_path=model.artifact_location,
            model_uuid=model.model_id,
            run_id=model.source_run_id,
            model_id=model.model_id,
        )
        mlflow.pyfunc.save_model(
            path=str(local),
            python_model=str(served.serving_code),
            artifacts={"model": str(served.folder)},
            code_paths=[str(p) for p in served.code_paths],
            signature=served.signature,
            pip_requirements=pip_requirements,
            mlflow_model=mlflow_model,
        )
        client.log_model_artifacts(model.model_id, str(local))
    client.finalize_logged_model(model.model_id, "READY")


def run_in_store(client: Any, run_id: str) -> Any:
    """The run, or None when ``run_id`` is empty or the store holds no such run. Any other failure (a locked or
    stopped store) is raised: only a missing run is skipped."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def link_metrics(client: Any, model_id: str, links: list[MetricLink]) -> dict[str, float]:
    """Attach metrics the runs already logged to the LoggedModel, each with its dataset (name and digest), as
    MLflow's own ``log_model`` does: the same point (key, value, step, timestamp) logged again with ``model_id``
    adds nothing to the run's history (the store drops exact duplicates) and one row to the model's metrics."""
    from mlflow.entities import Metric

    linked: dict[str, float] = {}
    for link in links:
        run = run_in_store(client, link.run_id)
        if run is None:  # no run, or one this store does not hold (records copied from another state root)
            continue
        keys = [k for k in run.data.metrics if k.startswith(link.prefixes)]
        batch = []
        for k in sorted(keys):
            last = max(client.get_metric_history(link.run_id, k), key=lambda m: (m.step, m.timestamp))
            ds = link.dataset
            batch.append(
                Metric(
                    k,
                    last.value,
                    last.timestamp,
                    last.step,
                    model_id=model_id,
                    dataset_name=ds.name if ds else None,
                    dataset_digest=ds.digest if ds else None,
                    run_id=link.run_id,
                )
            )
            linked[k] = last.value
        for i in range(0, len(batch), 1000):
            client.log_batch(link.run_id, metrics=batch[i : i + 1000])
    return linked


@contextlib.contextmanager
def _registry_sees(tracking_uri: str) -> Iterator[None]:
    """MLflow 3.17's SQL model registry resolves a ``models:/<model_id>`` source with a default ``MlflowClient()``,
    i.e. through the process-wide tracking URI (mlflow/store/model_registry/sqlalchemy_store.py,
    ``create_model_version``: "TODO: Propagate tracking URI to file sqlalchemy directly, rather than relying on
    global URI"). For that one call the process-wide value names the Tracker's store; the previous value (usually
    none: then MLFLOW_TRACKING_URI or MLflow's default applies again) is put back. The environment is untouched."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    utils._tracking_uri = tracking_uri
    try:
        yield
    finally:
        utils._tracking_uri = before


def create_version(
    client: Any, tracking_uri: str, name: str, model: Any, tags: dict[str, str], description: str | None = None
) -> NewVersion:
    """Register the LoggedModel as a new version of ``name`` (source ``models:/<model_id>``, which the UI's version
    page links to; run = the model's source run) and record the version on the model (``mlflow.modelVersions``)."""
    ensure_registered_model(client, name)
    with _registry_sees(tracking_uri):
        mv = client.create_model_version(
            name,
            source=f"models:/{model.model_id}",
            run_id=model.source_run_id,
            tags=tags,
            description=description,
            model_id=model.model_id,
        )
    raw = client.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG)
    listed = (json.loads(raw) if raw else []) + [{"name": name, "version": str(mv.version)}]
    client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps(listed)})
    return NewVersion(name, str(mv.version), model.model_id, model.source_run_id or "")


def find_version_by_tag(client: Any, name: str, tag: str, value: str) -> Any | None:
    """An existing version of the model carrying ``tag=value`` (so re-runs do not register duplicates)."""
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(tag) == value:
            return mv
    return None


def champion(client: Any, name: str) -> Champion | None:
    """The version holding the ``champion`` alias; None only when the model or that alias does not exist.
    Any other registry error (a database that cannot be read, say) is raised: it must never read as
    "no champion", which would move the alias."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = dict(model.aliases or {}).get("champion")
    if version is None:
        return None
    mv = client.get_model_version(name, str(version))
    return Champion(str(mv.version), dict(mv.tags))


def champion_history(client: Any, name: str) -> list[dict[str, Any]]:
    """Every champion move recorded on the model, oldest first."""
    raw = dict(client.get_registered_model(name).tags or {}).get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def move_champion(client: Any, name: str, version: str, reason: str, when: str) -> str | None:
    """Give ``version`` the champion alias; the previous holder is appended to the model's champion history
    (a registered-model tag, JSON list of {version, reason, at, previous}) and gets alias ``previous-champion``.
    Returns the previous champion."""
    prev = champion(client, name)
    history = champion_history(client, name)
    entry = {"version": version, "previous": prev.version if prev else None, "reason": reason, "at": when}
    last = history[-1] if history else {}
    if (last.get("version"), last.get("previous"), last.get("reason")) != (version, entry["previous"], reason):
        history.append(entry)  # a move retried after the store failed mid-way is recorded once
    # the history, the reason and previous-champion first; the champion alias last: until it is written the move
    # has not happened, and a retry redoes it whole
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-50:]))
    client.set_model_version_tag(name, version, "finetune.champion_reason", reason)
    if prev is not None and prev.version != version:
        client.set_registered_model_alias(name, "previous-champion", prev.version)
    client.set_registered_model_alias(name, "champion", version)
    return prev.version if prev else None


def clear_aliases(client: Any, name: str, version: str) -> None:
    """Remove challenger/champion from ``version`` if it holds them (a version that failed its reload check)."""
    aliases = dict(client.get_registered_model(name).aliases or {})
    for alias in ("challenger", "champion"):
        if str(aliases.get(alias)) == str(version):
            client.delete_registered_model_alias(name, alias)


def reload_diff(client: Any, name: str, version: str) -> float | None:
    """The recorded round-trip result of a version, if it was verified already."""
    raw = client.get_model_version(name, version).tags.get(RELOAD_TAG)
    return float(raw) if raw is not None else None


def record_reload_diff(client: Any, name: str, version: str, diff: float) -> None:
    """Keep the round-trip result on the version, so it is verified exactly once."""
    client.set_model_version_tag(name, version, RELOAD_TAG, repr(diff))


def load_registered(client: Any, tracking_uri: str, name: str, version: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version, loaded back from the registry's copy of the weights (its
    storage location, read through the client's registry: no process-wide URI)."""
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = client.get_model_version_download_uri(name, version)
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=d, tracking_uri=tracking_uri))
        folder = local / "artifacts" / "model"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    return model.eval(), tok


def finite(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics that have a value (None and NaN mean "not measured" and are not logged)."""
    return {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}
