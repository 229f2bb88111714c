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


class StateStore(dg.ConfigurableResource):
    """Folder for datasets, adapters, reports and provisioned models. Empty = FINETUNE_HOME (default ./.finetune)."""

    root: str = ""

    def root_path(self) -> Path:
        return Path(self.root).expanduser().resolve() if self.root else paths.state_root()

    def pipeline_dir(self, pipeline: str) -> Path:
        d = self.root_path() / "pipelines" / pipeline
        d.mkdir(parents=True, exist_ok=True)
        return d

    def models_dir(self) -> Path:
        return self.root_path() / "models"


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking + registry. Empty tracking_uri = SQLite under the state root."""

    tracking_uri: str = ""
    artifact_root: str = ""
    ui_url: str = "http://127.0.0.1:5000"

    def setup_for(self, state: StateStore) -> tuple[str, Path]:
        from finetune_pipeline.tracking import mlflow_store

        uri = self.tracking_uri or f"sqlite:///{state.root_path() / 'mlflow' / 'mlflow.db'}"
        art = Path(self.artifact_root) if self.artifact_root else state.root_path() / "mlflow" / "artifacts"
        mlflow_store.configure(uri, art)
        return uri, art


class OptunaStorage(dg.ConfigurableResource):
    """Optuna RDB storage. Empty = SQLite under the state root; a shared database lets trials run on many workers."""

    storage_uri: str = ""

    def uri_for(self, state: StateStore) -> str:
        return self.storage_uri or f"sqlite:///{state.root_path() / 'optuna' / 'optuna.db'}"


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
