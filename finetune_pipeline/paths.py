"""Where things are found from the environment: the state root (``FINETUNE_HOME``) and the specs folder
(``FINETUNE_SPECS``). What lives under the state root is the layout's business (finetune_pipeline.layout)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

STATE_ENV = "FINETUNE_HOME"
SPECS_ENV = "FINETUNE_SPECS"
POSTGRES_ENV = "FINETUNE_POSTGRES_URL"  # the scale-out switch: a PostgreSQL server URL (no database name)
ARTIFACTS_ENV = "FINETUNE_ARTIFACT_URI"  # where MLflow artifacts go (a folder or a URI such as s3://bucket/path)
# the checkout this package runs from (editable install): the dg project, pyproject.toml with [tool.dg]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATABASES = {"dagster": "finetune_dagster", "mlflow": "finetune_mlflow", "optuna": "finetune_optuna"}


def state_root() -> Path:
    """The state root, absolute. ``FINETUNE_HOME`` moves it; the default is ``.finetune`` under the working directory."""
    return Path(os.environ.get(STATE_ENV) or ".finetune").expanduser().resolve()


@dataclass(frozen=True)
class PostgresProfile:
    """One PostgreSQL server holds Dagster's, MLflow's and Optuna's databases (created by `finetune-pipeline
    postgres-init`). The URLs carry the password from the environment: never log or show them."""

    server: str

    def url(self, component: str) -> str:
        """The SQLAlchemy URL of a component's database (dagster, mlflow or optuna). The driver is named: SQLAlchemy
        2.1 defaults to psycopg 3, while dagster-postgres brings psycopg2."""
        return self.database_url(DATABASES[component], scheme="postgresql+psycopg2")

    def database_url(self, name: str, scheme: str = "postgresql") -> str:
        """The server URL with ``name`` as its database (query parameters such as sslmode are kept)."""
        return urlunsplit(urlsplit(self.server)._replace(scheme=scheme, path="/" + name))


def postgres_profile() -> PostgresProfile | None:
    """The PostgreSQL profile when ``FINETUNE_POSTGRES_URL`` is set, else None (SQLite under the state root)."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        return None
    if not url.startswith(("postgresql://", "postgresql+psycopg2://", "postgres://")):
        raise ValueError(
            f"{POSTGRES_ENV} must be a postgresql:// URL (e.g. postgresql://user:pass@host:5432), got a {url.split(':')[0]} URL"
        )
    return PostgresProfile(url.replace("postgres://", "postgresql://", 1))


def artifact_uri() -> str | None:
    """``FINETUNE_ARTIFACT_URI``: where MLflow keeps artifacts (None: under the state root)."""
    return os.environ.get(ARTIFACTS_ENV) or None


def specs_dir() -> Path:
    """The folder of pipeline specs: ``FINETUNE_SPECS``, default ``./specs``."""
    return Path(os.environ.get(SPECS_ENV) or "specs").expanduser().resolve()
