"""MLflow: experiments per pipeline, lineage tags, dataset inputs, registry versions and aliases.

A leaf: it records what the callers computed and decided (the gain over the champion, the reload's logit
difference); it imports no other layer of the package. mlflow is imported inside functions so that loading the
Dagster definitions stays fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

TAG_PREFIX = "finetune."
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers>=5.23,<6", "accelerate>=1.15,<1.16"]


@dataclass(frozen=True)
class Lineage:
    """Who produced a run: attached to every MLflow run as tags."""

    pipeline: str
    asset: str
    dagster_run_id: str
    partition: str | None
    code_version: str
    spec_hash: str

    def tags(self) -> dict[str, str]:
        t = {
            "dagster.run_id": self.dagster_run_id,
            "dagster.asset_key": self.asset,
            "dagster.partition": self.partition or "",
            "dagster.code_version": self.code_version,
            f"{TAG_PREFIX}pipeline": self.pipeline,
            f"{TAG_PREFIX}spec_hash": self.spec_hash,
        }
        return t


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs and models are recorded, and the UI that shows them (from the Dagster resource)."""

    tracking_uri: str
    artifact_root: str | None  # a local folder or a URI (s3://..., file://...)
    ui_url: str = "http://127.0.0.1:5000"

    def run_url(self, experiment: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def configure(tracking_uri: str, artifact_root: str | Path | None) -> None:
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if artifact_root is not None and "://" not in str(artifact_root):
        Path(artifact_root).mkdir(parents=True, exist_ok=True)


def experiment_id(name: str, artifact_root: str | Path | None) -> str:
    """The pipeline's experiment, created on first use with its artifacts under ``artifact_root/name``."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    if artifact_root is None:
        loc = None
    elif "://" in str(artifact_root):
        loc = f"{str(artifact_root).rstrip('/')}/{name}"
    else:
        loc = (Path(artifact_root).resolve() / name).as_uri()
    return str(mlflow.create_experiment(name, artifact_location=loc))


def experiment_for(target: TrackingTarget, pipeline: str) -> str:
    """Point MLflow at the target and return the pipeline's experiment id (created on first use)."""
    configure(target.tracking_uri, target.artifact_root)
    return experiment_id(pipeline, target.artifact_root)


@contextlib.contextmanager
def run(experiment: str, run_name: str, lineage: Lineage, nested: bool = False, **extra_tags: str) -> Iterator[Any]:
    import mlflow

    with mlflow.start_run(
        experiment_id=experiment, run_name=run_name, nested=nested, tags={**lineage.tags(), **extra_tags}
    ) as r:
        yield r


def log_dataset(df: pd.DataFrame, name: str, digest: str, source: str, context: str) -> None:
    """Record a dataset input on the active run, with the same digest as the Dagster data version."""
    import mlflow

    ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
    mlflow.log_input(ds, context=context)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics(
        {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}, step=step
    )


def log_series(name: str, points: list[tuple[int, float]] | list[list[float]]) -> None:
    """A metric curve (step, value) on the active run."""
    import mlflow

    for step, value in points:
        mlflow.log_metric(name, float(value), step=int(step))


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    mlflow.log_params(params)


def set_tags(tags: dict[str, str]) -> None:
    import mlflow

    mlflow.set_tags(tags)


def log_artifact(path: Path) -> None:
    import mlflow

    mlflow.log_artifact(str(path))


def log_artifacts(folder: Path, artifact_path: str) -> None:
    import mlflow

    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def log_png(png: bytes, name: str) -> None:
    """A PNG image (a plot) as a run artifact."""
    _log_bytes(png, name)


def _log_bytes(data: bytes, name: str) -> None:
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / name
        f.write_bytes(data)
        mlflow.log_artifact(str(f))


def log_trial(
    experiment: str,
    lineage: Lineage,
    number: int,
    params: dict[str, Any],
    state: str,
    metrics: dict[str, float],
    loss_history: list[tuple[int, float]],
    study: str,
) -> None:
    """One sweep trial as a nested run under the active (sweep) run."""
    tags = {"optuna.study": study, "optuna.trial": str(number), "optuna.state": state}
    with run(experiment, f"trial-{number}", lineage, nested=True, **tags):
        log_params(params)
        log_series("train_loss", loss_history)
        log_metrics(metrics)


def chat_signature(max_new_tokens: int) -> Any:
    """Input: a string ``prompt`` or OpenAI-style ``messages``; params: max_new_tokens (max_tokens), temperature, seed."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    inputs = Schema(
        [ColSpec(DataType.string, "prompt", required=False), ColSpec(Array(message), "messages", required=False)]
    )
    params = ParamSchema(
        [
            ParamSpec("max_new_tokens", DataType.long, max_new_tokens),
            ParamSpec("max_tokens", DataType.long, None),
            ParamSpec("temperature", DataType.double, 0.0),
            ParamSpec("seed", DataType.long, 0),
        ]
    )
    return ModelSignature(inputs=inputs, params=params)


def log_and_register(
    model: Any,
    tokenizer: Any,
    registered_name: str,
    version_tags: dict[str, str],
    serving_code: Path,
    code_paths: list[Path],
    serving_defaults: dict[str, Any],
) -> tuple[str, str]:
    """Log a (merged) model with its tokenizer (chat template included) as a pyfunc chat model whose code is
    ``serving_code`` (MLflow models-from-code), and register it; returns (model_uri, version)."""
    import json
    import tempfile

    import mlflow
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "serving.json").write_text(json.dumps(serving_defaults, indent=2))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(serving_code),
            artifacts={"model": str(folder)},
            code_paths=[str(p) for p in code_paths],
            signature=chat_signature(int(serving_defaults["max_new_tokens"])),
            pip_requirements=PIP_REQUIREMENTS,
        )
    client = MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(registered_name, description="Fine-tuned by finetune_pipeline.")
    mv = mlflow.register_model(info.model_uri, registered_name, tags=version_tags)
    return f"models:/{registered_name}/{mv.version}", str(mv.version)


@dataclass(frozen=True)
class Champion:
    version: str
    tags: dict[str, str]


def champion(registered_name: str) -> Champion | None:
    """The version holding the ``champion`` alias; None only when the model or that alias does not exist.
    Any other registry error (a database that cannot be read, say) is raised: it must never read as
    "no champion", which would move the alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        model = client.get_registered_model(registered_name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = dict(model.aliases or {}).get("champion")
    if version is None:
        return None
    mv = client.get_model_version(registered_name, str(version))
    return Champion(str(mv.version), dict(mv.tags))


HISTORY_TAG = "finetune.champion_history"


def record_evidence(registered_name: str, version: str, tags: dict[str, str], description: str) -> None:
    """Store the evaluation evidence on the version (tags) and its model card (the version description)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for k, v in tags.items():
        client.set_model_version_tag(registered_name, version, k, v)
    client.update_model_version(registered_name, version, description=description)


def set_challenger(registered_name: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(registered_name, "challenger", version)


def move_champion(registered_name: str, version: str, reason: str, when: str) -> str | None:
    """Give ``version`` the champion alias; the previous holder is appended to the model's champion history
    (a registered-model tag, JSON list of {version, reason, at, previous}) and gets alias ``previous-champion``.
    Returns the previous champion."""
    import json

    from mlflow import MlflowClient

    client = MlflowClient()
    prev = champion(registered_name)
    history = champion_history(registered_name)
    entry = {"version": version, "previous": prev.version if prev else None, "reason": reason, "at": when}
    last = history[-1] if history else {}
    if (last.get("version"), last.get("previous"), last.get("reason")) != (version, entry["previous"], reason):
        history.append(entry)  # a move retried after the store failed mid-way is recorded once
    # the history, the reason and previous-champion first; the champion alias last: until it is written the move
    # has not happened, and a retry redoes it whole
    client.set_registered_model_tag(registered_name, HISTORY_TAG, json.dumps(history[-50:]))
    client.set_model_version_tag(registered_name, version, "finetune.champion_reason", reason)
    if prev is not None and prev.version != version:
        client.set_registered_model_alias(registered_name, "previous-champion", prev.version)
    client.set_registered_model_alias(registered_name, "champion", version)
    return prev.version if prev else None


def champion_history(registered_name: str) -> list[dict[str, Any]]:
    """Every champion move recorded on the model, oldest first."""
    import json

    from mlflow import MlflowClient

    raw = dict(MlflowClient().get_registered_model(registered_name).tags or {}).get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def version_tags(registered_name: str, version: str) -> dict[str, str]:
    from mlflow import MlflowClient

    return dict(MlflowClient().get_model_version(registered_name, version).tags)


def clear_aliases(registered_name: str, version: str) -> None:
    """Remove challenger/champion from ``version`` if it holds them (a version that failed its reload check)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    aliases = dict(client.get_registered_model(registered_name).aliases or {})
    for alias in ("challenger", "champion"):
        if str(aliases.get(alias)) == str(version):
            client.delete_registered_model_alias(registered_name, alias)


RELOAD_TAG = "finetune.reload_max_logit_diff"


def reload_diff(registered_name: str, version: str) -> float | None:
    """The recorded round-trip result of a version, if it was verified already."""
    from mlflow import MlflowClient

    raw = MlflowClient().get_model_version(registered_name, version).tags.get(RELOAD_TAG)
    return float(raw) if raw is not None else None


def load_registered(registered_name: str, version: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a registered version, loaded back from the registry's copy of the weights."""
    import tempfile

    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{registered_name}/{version}", dst_path=d))
        folder = local / "artifacts" / "model"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    return model.eval(), tok


def record_reload_diff(registered_name: str, version: str, diff: float) -> None:
    """Keep the round-trip result on the version, so it is verified exactly once."""
    from mlflow import MlflowClient

    MlflowClient().set_model_version_tag(registered_name, version, RELOAD_TAG, repr(diff))


def find_version_by_tag(registered_name: str, tag: str, value: str) -> Any | None:
    """An existing version of the model carrying ``tag=value`` (so re-runs do not register duplicates)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for mv in client.search_model_versions(f"name = '{registered_name}'"):
        if mv.tags.get(tag) == value:
            return mv
    return None


def trace(model_uri: str) -> dict[str, Any]:
    """Follow ``models:/name@alias`` (or ``/version``) back to its runs, datasets and drop files."""
    from mlflow import MlflowClient

    client = MlflowClient()
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, ver = rest.rsplit("/", 1)
        mv = client.get_model_version(name, ver)
    chain: dict[str, Any] = {"model": f"{name} v{mv.version}", "version_tags": dict(mv.tags), "runs": {}}
    for key in ("register_run_id", "eval_run_id", "train_run_id", "sweep_run_id"):
        rid = mv.tags.get(f"{TAG_PREFIX}{key}")
        if not rid:
            continue
        r = client.get_run(rid)
        chain["runs"][key] = {
            "run_id": rid,
            "name": r.info.run_name,
            "dagster_run_id": r.data.tags.get("dagster.run_id"),
            "asset": r.data.tags.get("dagster.asset_key"),
            "datasets": [
                {"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source}
                for d in (r.inputs.dataset_inputs if r.inputs else [])
            ],
        }
    return chain


def log_text(text: str, name: str) -> None:
    """A text artifact (a markdown or HTML report) on the active run."""
    _log_bytes(text.encode(), name)
