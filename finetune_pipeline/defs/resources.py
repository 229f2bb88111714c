"""Resources: where state goes (local folder by default), MLflow tracking, Optuna storage.

Each defaults to a location under the state root (FINETUNE_HOME); point them elsewhere with environment
variables (dagster EnvVar) for a shared setup, e.g. a Postgres URI for MLflow and Optuna. Secrets (database
passwords, tokens) belong in those environment variables, never in a spec.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from finetune_pipeline import paths
from finetune_pipeline.layout import PipelineLayout, StateLayout
from finetune_pipeline.tracking.mlflow_store import TrackingTarget


class StateStore(dg.ConfigurableResource):
    """Folder for datasets, adapters, reports and provisioned models. Empty = FINETUNE_HOME (default ./.finetune)."""

    root: str = ""

    def layout(self) -> StateLayout:
        return StateLayout(Path(self.root).expanduser().resolve() if self.root else paths.state_root())

    def pipeline(self, name: str) -> PipelineLayout:
        return self.layout().pipeline(name)


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking + registry. Empty tracking_uri = SQLite under the state root."""

    tracking_uri: str = ""
    artifact_root: str = ""
    ui_url: str = "http://127.0.0.1:5000"

    def target(self, state: StateStore) -> TrackingTarget:
        layout = state.layout()
        return TrackingTarget(
            tracking_uri=self.tracking_uri or f"sqlite:///{layout.mlflow_db}",
            artifact_root=Path(self.artifact_root) if self.artifact_root else layout.mlflow_artifacts,
            ui_url=self.ui_url,
        )


class OptunaStorage(dg.ConfigurableResource):
    """Optuna RDB storage. Empty = SQLite under the state root; a shared database lets trials run on many workers."""

    storage_uri: str = ""

    def uri_for(self, state: StateStore) -> str:
        return self.storage_uri or f"sqlite:///{state.layout().optuna_db}"


def _env(name: str) -> dg.EnvVar | str:
    """An EnvVar when the variable is set (its value stays out of the UI and the run config), else empty."""
    return dg.EnvVar(name) if os.environ.get(name) else ""


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "state": StateStore(),
        "mlflow_tracking": MlflowTracking(
            tracking_uri=_env("MLFLOW_TRACKING_URI"),
            ui_url=os.environ.get("FINETUNE_MLFLOW_UI", "http://127.0.0.1:5000"),
        ),
        "optuna": OptunaStorage(storage_uri=_env("FINETUNE_OPTUNA_STORAGE")),
    }
