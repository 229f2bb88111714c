"""Where state lives: one root (``FINETUNE_HOME``, default ``./.finetune``) holds everything the pipelines produce."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "FINETUNE_HOME"


def state_root() -> Path:
    """The state root, absolute. ``FINETUNE_HOME`` moves it; the default is ``.finetune`` under the working directory."""
    return Path(os.environ.get(STATE_ENV) or ".finetune").expanduser().resolve()


def pipeline_dir(pipeline: str) -> Path:
    """Folder for one pipeline's datasets, adapters and reports."""
    return state_root() / "pipelines" / pipeline


def models_dir() -> Path:
    """Folder for provisioned base models (safetensors folders)."""
    return state_root() / "models"


def mlflow_tracking_uri() -> str:
    """Default MLflow tracking store: SQLite under the state root."""
    return f"sqlite:///{state_root() / 'mlflow' / 'mlflow.db'}"


def mlflow_artifact_root() -> Path:
    return state_root() / "mlflow" / "artifacts"


def optuna_storage_uri() -> str:
    """Default Optuna storage: SQLite under the state root."""
    return f"sqlite:///{state_root() / 'optuna' / 'optuna.db'}"
