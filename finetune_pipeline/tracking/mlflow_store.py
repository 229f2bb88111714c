"""MLflow: experiments per pipeline, lineage tags, dataset inputs, registry versions and aliases.

mlflow is imported inside functions so that loading the Dagster definitions stays fast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_pipeline.evaluation.metrics import improvement

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


def configure(tracking_uri: str, artifact_root: Path | None) -> None:
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if artifact_root is not None:
        artifact_root.mkdir(parents=True, exist_ok=True)


def experiment_id(name: str, artifact_root: Path | None) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    loc = (artifact_root / name).as_uri() if artifact_root is not None else None
    return str(mlflow.create_experiment(name, artifact_location=loc))


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


@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    aliases: list[str]
    promoted: bool
    champion_version: str | None
    previous_champion: str | None
    previous_champion_score: float | None
    reason: str


def log_and_register(model: Any, tokenizer: Any, registered_name: str, version_tags: dict[str, str]) -> tuple[str, str]:
    """Log a (merged) transformers model on the active run and register it; returns (model_uri, version)."""
    import mlflow
    from mlflow import MlflowClient

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        pip_requirements=PIP_REQUIREMENTS,
    )
    client = MlflowClient()
    try:
        client.get_registered_model(registered_name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(registered_name, description="Fine-tuned by finetune_pipeline.")
    mv = mlflow.register_model(info.model_uri, registered_name, tags=version_tags)
    return f"models:/{registered_name}/{mv.version}", str(mv.version)


def promote(
    registered_name: str, version: str, primary_metric: str, score_value: float, min_delta: float
) -> Registration:
    """Give ``version`` the alias ``challenger``; move ``champion`` to it only if it beats the current champion.

    "Beats" means: better on the primary metric by more than ``min_delta`` (or there is no champion yet).
    The score is stored on the version as tag ``metric.<primary>`` so later versions compare against it.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_model_version_tag(registered_name, version, f"metric.{primary_metric}", repr(float(score_value)))
    client.set_registered_model_alias(registered_name, "challenger", version)
    try:
        champ = client.get_model_version_by_alias(registered_name, "champion")
    except mlflow.exceptions.MlflowException:
        champ = None
    prev_score: float | None = None
    if champ is None:
        ok, reason = True, "no champion yet"
    elif str(champ.version) == str(version):
        ok, reason = True, f"v{version} is already the champion"
    else:
        raw = champ.tags.get(f"metric.{primary_metric}")
        prev_score = float(raw) if raw is not None else None
        if prev_score is None:
            ok, reason = True, f"champion v{champ.version} has no {primary_metric} score"
        else:
            gain = improvement(primary_metric, float(score_value), prev_score)
            ok = gain > min_delta
            reason = (
                f"{primary_metric} {score_value:.4f} vs champion v{champ.version} {prev_score:.4f} "
                f"(improvement {gain:+.4f}, needs > {min_delta})"
            )
    if ok:
        client.set_registered_model_alias(registered_name, "champion", version)
    return Registration(
        name=registered_name,
        version=str(version),
        model_uri=f"models:/{registered_name}/{version}",
        aliases=["challenger"] + (["champion"] if ok else []),
        promoted=ok,
        champion_version=str(version) if ok else (str(champ.version) if champ else None),
        previous_champion=str(champ.version) if champ else None,
        previous_champion_score=prev_score,
        reason=reason,
    )


RELOAD_TAG = "finetune.reload_max_logit_diff"


def reload_diff(registered_name: str, version: str) -> float | None:
    """The recorded round-trip result of a version, if it was verified already."""
    from mlflow import MlflowClient

    raw = MlflowClient().get_model_version(registered_name, version).tags.get(RELOAD_TAG)
    return float(raw) if raw is not None else None


def verify_reload(registered_name: str, version: str, reference: Any) -> float:
    """Load the version back from the registry, compare its logits with ``reference`` (the model as trained),
    and record the largest absolute difference on the version."""
    import mlflow.transformers
    from mlflow import MlflowClient

    from finetune_pipeline.models.merge import max_logit_diff

    parts = mlflow.transformers.load_model(f"models:/{registered_name}/{version}", return_type="components")
    diff = max_logit_diff(reference, parts["model"], parts["tokenizer"])
    MlflowClient().set_model_version_tag(registered_name, version, RELOAD_TAG, repr(diff))
    return diff


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
