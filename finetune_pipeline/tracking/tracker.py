"""The Tracker: one object that records a pipeline's runs, datasets and model versions in ONE MLflow store.

It holds its own ``MlflowClient(tracking_uri, registry_uri)`` built from the pipeline's ``TrackingTarget`` (the
Dagster resource makes it), so what it reads and writes never depends on MLflow's process-wide URI, the
environment's MLFLOW_TRACKING_URI or what ran before in the process. Runs are opened through the client too
(``Tracker.run``), not through the fluent API's active-run stack.

The stages call domain-level methods: open a run and log to it (``run`` -> ``RunLog``), a sweep trial
(``log_trial``), register a version (``find_version`` / ``register_version``), read the champion, move aliases,
keep the round-trip record, load a version back, trace its lineage.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from finetune_pipeline.tracking import lineage, registry
from finetune_pipeline.tracking.mlflow_store import ADAPTER_TAG, Lineage, TrackingTarget
from finetune_pipeline.tracking.registry import Champion, MetricLink, NewVersion, ServedModel

_BATCH = 1000  # MLflow's limit of metrics per log_batch call


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """An exclusive lock on ``<db>.lock`` while a SQLite store is opened: two processes opening a fresh store at the
    same moment (the schedule's run and a person's) otherwise race in MLflow's own schema migration and one fails
    ("table _alembic_tmp_... already exists"). Once the tables exist, opening under it is one quick read."""
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: unlocked, as MLflow itself is
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class RunLog:
    """One open MLflow run, written through the tracker's client."""

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Metrics with a value (None and NaN are "not measured" and skipped)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics([Metric(k, v, now, step or 0) for k, v in registry.finite(metrics).items()])

    def log_series(self, name: str, points: list[tuple[int, float]] | list[list[float]]) -> None:
        """A metric curve (step, value)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._metrics([Metric(name, float(v), now, int(s)) for s, v in points])

    def _metrics(self, metrics: list[Any]) -> None:
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    def log_dataset(self, df: pd.DataFrame, name: str, digest: str, source: str, context: str) -> None:
        """A dataset input of the run, with the same digest as the Dagster data version."""
        import mlflow
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        ds = mlflow.data.from_pandas(df, source=source, name=name, digest=digest)
        entity = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
        self.client.log_inputs(self.run_id, datasets=[entity])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_png(self, png: bytes, name: str) -> None:
        """A PNG image (a plot) as a run artifact."""
        self._log_bytes(png, name)

    def log_text(self, text: str, name: str) -> None:
        """A text artifact (a markdown or HTML report)."""
        self._log_bytes(text.encode(), name)

    def _log_bytes(self, data: bytes, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / name
            f.write_bytes(data)
            self.log_artifact(f)


class Tracker:
    """A pipeline's MLflow store (tracking + registry) behind its own client; ``pipeline`` names the experiment
    (None for registry-only use, e.g. the promote and rollback commands)."""

    def __init__(self, target: TrackingTarget, pipeline: str | None = None) -> None:
        self.target, self.pipeline = target, pipeline

    @cached_property
    def client(self) -> Any:
        from mlflow import MlflowClient

        dbs = sorted(
            {
                Path(u.removeprefix("sqlite:///"))
                for u in (self.target.tracking_uri, self.target.registry)
                if u.startswith("sqlite:///")
            }
        )
        with contextlib.ExitStack() as locks:
            for db in dbs:
                locks.enter_context(_store_lock(db))
            client = MlflowClient(tracking_uri=self.target.tracking_uri, registry_uri=self.target.registry)
            if dbs:  # build both stores while locked: their tables are created / migrated here
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
        return client

    @cached_property
    def experiment_id(self) -> str:
        """The pipeline's experiment, created on first use with its artifacts under ``artifact_root/<pipeline>``."""
        if not self.pipeline:
            raise ValueError("this Tracker has no pipeline, so no experiment: build it with Tracker(target, name)")
        exp = self.client.get_experiment_by_name(self.pipeline)
        if exp is not None:
            return str(exp.experiment_id)
        root = self.target.artifact_root
        if root is None:
            loc = None
        elif "://" in str(root):
            loc = f"{str(root).rstrip('/')}/{self.pipeline}"
        else:
            Path(root).mkdir(parents=True, exist_ok=True)
            loc = (Path(root).resolve() / self.pipeline).as_uri()
        try:
            return str(self.client.create_experiment(self.pipeline, artifact_location=loc))
        except Exception:  # another process created it between the lookup and here
            exp = self.client.get_experiment_by_name(self.pipeline)
            if exp is None:
                raise
            return str(exp.experiment_id)

    def run_url(self, run_id: str) -> str:
        return self.target.run_url(self.experiment_id, run_id)

    # runs ----------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self, name: str, lineage: Lineage, parent_run_id: str | None = None, **tags: str) -> Iterator[RunLog]:
        """A run in the pipeline's experiment tagged with its lineage; FINISHED when the block ends, FAILED (KILLED
        on Ctrl-C) when it raises."""
        from mlflow.tracking.context.registry import resolve_tags
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        all_tags = {**lineage.tags(), **tags, **({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {})}
        r = self.client.create_run(self.experiment_id, run_name=name, tags=resolve_tags(all_tags))
        try:
            yield RunLog(self.client, r.info.run_id, self.experiment_id)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the block's error is the one to see
                self.client.set_terminated(r.info.run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        self.client.set_terminated(r.info.run_id, "FINISHED")

    def log_trial(
        self,
        parent_run_id: str,
        lineage: Lineage,
        number: int,
        params: dict[str, Any],
        state: str,
        metrics: dict[str, float],
        loss_history: list[tuple[int, float]],
        study: str,
    ) -> None:
        """One sweep trial as a nested run under the sweep run."""
        tags = {"optuna.study": study, "optuna.trial": str(number), "optuna.state": state}
        with self.run(f"trial-{number}", lineage, parent_run_id=parent_run_id, **tags) as run:
            run.log_params(params)
            run.log_series("train_loss", loss_history)
            run.log_metrics(metrics)

    # registry ------------------------------------------------------------------------------------------------------
    def find_version(self, model_name: str, adapter_key: str) -> Any | None:
        """The version already registered for this adapter, if any (so re-runs never register a duplicate)."""
        return registry.find_version_by_tag(self.client, model_name, ADAPTER_TAG, adapter_key)

    def register_version(
        self,
        model_name: str,
        served: ServedModel,
        source_run_id: str,
        params: dict[str, Any],
        version_tags: dict[str, str],
        metrics: list[MetricLink],
        input_of: tuple[str, ...] = (),
    ) -> NewVersion:
        """Log the served model as an MLflow 3 LoggedModel produced by ``source_run_id`` (the training run, which
        holds its dataset inputs), with ``params``, the ``metrics`` the runs measured (each linked to its dataset and
        digest), recorded as an input of the runs in ``input_of``; then register it as a new version of
        ``model_name`` carrying ``version_tags``. A failure before the version exists marks the LoggedModel FAILED
        (a retry makes a new one: the version is what ``find_version`` looks for)."""
        from mlflow.entities import LoggedModelInput

        model = registry.create_logged_model(
            self.client, self.experiment_id, model_name, source_run_id, params, version_tags
        )
        try:
            registry.save_served_model(self.client, model, served, registry.PIP_REQUIREMENTS)
            registry.link_metrics(self.client, model.model_id, metrics)
            for run_id in dict.fromkeys(r for r in input_of if registry.run_in_store(self.client, r) is not None):
                self.client.log_inputs(run_id, models=[LoggedModelInput(model.model_id)])
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to see
                self.client.finalize_logged_model(model.model_id, "FAILED")
            raise
        return registry.create_version(self.client, self.target.tracking_uri, model_name, model, version_tags)

    def champion(self, model_name: str) -> Champion | None:
        """The version holding ``champion`` (None when there is none; an unreadable registry raises)."""
        return registry.champion(self.client, model_name)

    def champion_history(self, model_name: str) -> list[dict[str, Any]]:
        return registry.champion_history(self.client, model_name)

    def move_champion(self, model_name: str, version: str, reason: str, when: str) -> str | None:
        """Give ``version`` the champion alias with the reason in the champion history; returns the previous one."""
        return registry.move_champion(self.client, model_name, version, reason, when)

    def set_challenger(self, model_name: str, version: str) -> None:
        self.client.set_registered_model_alias(model_name, "challenger", version)

    def clear_aliases(self, model_name: str, version: str) -> None:
        """Take challenger/champion away from ``version`` (its registry copy failed the round trip)."""
        registry.clear_aliases(self.client, model_name, version)

    def record_evidence(self, model_name: str, version: str, tags: dict[str, str], card: str) -> None:
        """The evaluation evidence on the version (tags) and its model card (the version description)."""
        for k, v in tags.items():
            self.client.set_model_version_tag(model_name, version, k, v)
        self.client.update_model_version(model_name, version, description=card)

    def version_tags(self, model_name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(model_name, version).tags)

    def reload_diff(self, model_name: str, version: str) -> float | None:
        """The recorded round-trip result of a version (None: not verified yet)."""
        return registry.reload_diff(self.client, model_name, version)

    def record_reload_diff(self, model_name: str, version: str, diff: float) -> None:
        registry.record_reload_diff(self.client, model_name, version, diff)

    def logged_model_id(self, model_name: str, version: str) -> str | None:
        """The LoggedModel a version was registered from (None for versions registered before LoggedModels)."""
        source = self.client.get_model_version(model_name, version).source or ""
        return source.removeprefix("models:/") if source.startswith("models:/m-") else None

    def log_version_artifacts(self, model_name: str, version: str, folder: Path, artifact_path: str) -> str:
        """Files that belong to a version (a release bundle, a report) under ``artifact_path``: in its LoggedModel's
        artifacts (they then travel with the version's download), or, for an older version, in its source run.
        Returns where they went (``models:/<model_id>/<path>`` or ``runs:/<run_id>/<path>``)."""
        model_id = self.logged_model_id(model_name, version)
        if model_id is not None:
            self.client.log_model_artifacts(model_id, str(folder), artifact_path)
            return f"models:/{model_id}/{artifact_path}"
        run_id = self.client.get_model_version(model_name, version).run_id
        self.client.log_artifacts(run_id, str(folder), artifact_path)
        return f"runs:/{run_id}/{artifact_path}"

    def load_version(self, model_name: str, version: str) -> tuple[Any, Any]:
        """(model, tokenizer) loaded back from the registry's copy of a version's weights."""
        return registry.load_registered(self.client, self.target.tracking_uri, model_name, version)

    def trace(self, model_uri: str) -> dict[str, Any]:
        """``models:/name@alias`` (or ``/version``) back to its runs, datasets, metrics and drop files."""
        return lineage.trace(self.client, model_uri)
