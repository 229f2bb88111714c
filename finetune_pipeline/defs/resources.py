"""Resources: where state goes (local folder by default), MLflow tracking, Optuna storage.

Each defaults to a location under the state root (FINETUNE_HOME); point them elsewhere with environment
variables (dagster EnvVar) for a shared setup, e.g. a Postgres URI for MLflow and Optuna. Secrets (database
passwords, tokens) belong in those environment variables, never in a spec.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import dagster as dg

from finetune_pipeline import paths
from finetune_pipeline.layout import PipelineLayout, StateLayout
from finetune_pipeline.tracking.mlflow_store import TrackingTarget
from finetune_pipeline.tracking.tracker import Tracker


class StateStore(dg.ConfigurableResource):
    """Folder for datasets, adapters, reports and provisioned models. Empty = FINETUNE_HOME (default ./.finetune)."""

    root: str = ""

    def layout(self) -> StateLayout:
        return StateLayout(Path(self.root).expanduser().resolve() if self.root else paths.state_root())

    def pipeline(self, name: str) -> PipelineLayout:
        return self.layout().pipeline(name)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking + registry. Empty tracking_uri = the PostgreSQL profile's database, else SQLite under the state
    root; empty artifact_root = FINETUNE_ARTIFACT_URI, else a folder under the state root."""

    tracking_uri: str = ""
    registry_uri: str = ""  # empty = the tracking URI
    artifact_root: str = ""
    ui_url: str = "http://127.0.0.1:5000"

    def target(self, state: StateStore) -> TrackingTarget:
        """Explicit settings first, then the PostgreSQL profile (FINETUNE_POSTGRES_URL, read now, never stored),
        then SQLite and artifacts under the state root."""
        layout, pg = state.layout(), paths.postgres_profile()
        default_uri = pg.url("mlflow") if pg else f"sqlite:///{layout.mlflow_db}"
        return TrackingTarget(
            tracking_uri=self.tracking_uri or default_uri,
            artifact_root=self.artifact_root or paths.artifact_uri() or str(layout.mlflow_artifacts),
            ui_url=self.ui_url,
            registry_uri=self.registry_uri,
        )

    def tracker(self, state: StateStore, pipeline: str) -> Tracker:
        """The pipeline's Tracker: its own MlflowClient on this target (MLflow's process-wide URI is never used)."""
        return Tracker(self.target(state), pipeline)


class OptunaStorage(dg.ConfigurableResource):
    """Optuna RDB storage. Empty = the PostgreSQL profile's database, else SQLite under the state root; a shared
    database lets trials run on many workers."""

    storage_uri: str = ""

    def uri_for(self, state: StateStore) -> str:
        pg = paths.postgres_profile()
        return self.storage_uri or (pg.url("optuna") if pg else f"sqlite:///{state.layout().optuna_db}")


def _env(name: str) -> dg.EnvVar | str:
    """An EnvVar when the variable is set (its value stays out of the UI and the run config), else empty."""
    return dg.EnvVar(name) if os.environ.get(name) else ""


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources every pipeline uses. The same objects while the environment is unchanged, so the code
    location and each FineTunePipeline component (which brings its own, to work in any dg project) merge."""
    keys = ("MLFLOW_TRACKING_URI", "FINETUNE_MLFLOW_UI", "FINETUNE_OPTUNA_STORAGE")
    return dict(_default_resources(tuple(os.environ.get(k) for k in keys)))


@functools.cache
def _default_resources(_env_key: tuple[str | None, ...]) -> dict[str, dg.ConfigurableResource]:
    return {
        "state": StateStore(),
        "mlflow_tracking": MlflowTracking(
            tracking_uri=_env("MLFLOW_TRACKING_URI"),
            ui_url=os.environ.get("FINETUNE_MLFLOW_UI", "http://127.0.0.1:5000"),
        ),
        "optuna": OptunaStorage(storage_uri=_env("FINETUNE_OPTUNA_STORAGE")),
    }
