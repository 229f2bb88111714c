"""Tier 3 on the scale-out profile: a real PostgreSQL server (Debian's binaries) started in a temporary folder holds
Dagster's runs and events, MLflow's runs and registry, and Optuna's study; the pipeline runs end to end through the
real CLI with FINETUNE_POSTGRES_URL as the only switch."""

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_pipeline.paths import DATABASES, PostgresProfile
from finetune_pipeline_tests.conftest import REPO
from finetune_pipeline_tests.test_cli import cli, dagster_cli, ingest_all, make_world


def _pg_bin() -> Path | None:
    for cand in [shutil.which("initdb"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)]:
        if cand and Path(cand).exists() and (Path(cand).parent / "pg_ctl").exists():
            return Path(cand).resolve().parent
    return None


PG_BIN = _pg_bin()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        PG_BIN is None, reason="no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (as `nobody` when the tests run as root: initdb refuses root)."""
    folder = Path(tempfile.mkdtemp(prefix="finetune-pg-"))
    folder.chmod(0o777)
    as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    data, port = folder / "data", _free_port()
    run = lambda *a: subprocess.run([*as_user, *a], check=True, capture_output=True, timeout=120)  # noqa: E731
    run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        f"-p {port} -k {folder} -h 127.0.0.1",
        "-l",
        str(folder / "log"),
        "-w",
        "start",
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_the_pipeline_runs_end_to_end_on_postgres(postgres: str, tmp_path: Path, tiny_model: Path) -> None:
    import mlflow
    import optuna
    import psycopg2

    pg = PostgresProfile(postgres)
    w = make_world(tmp_path, tiny_model)
    w["env"].update(
        FINETUNE_POSTGRES_URL=postgres,
        DAGSTER_HOME=str(REPO / "deploy" / "postgres"),
        FINETUNE_DAGSTER_POSTGRES_URL=pg.url("dagster"),
        FINETUNE_ARTIFACT_URI=str(tmp_path / "artifacts"),
    )
    out = cli(w, sys.executable, "-m", "finetune_pipeline.cli", "postgres-init")
    assert "finetune_dagster" in out and "finetune_mlflow" in out and "finetune_optuna" in out
    assert len(ingest_all(w)) == 2
    dagster_cli(w, "job", "execute", "-j", "mini_train")

    # Dagster's runs and events are in PostgreSQL
    with psycopg2.connect(pg.database_url(DATABASES["dagster"])) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE status = 'SUCCESS'")
        assert cur.fetchone()[0] >= 3  # two ingests and the train job
        cur.execute("SELECT count(*) FROM event_logs WHERE asset_key LIKE %s", ("%registered_model%",))
        assert cur.fetchone()[0] > 0
    # MLflow: runs and the registered champion, with artifacts under FINETUNE_ARTIFACT_URI
    client = mlflow.MlflowClient(tracking_uri=pg.url("mlflow"), registry_uri=pg.url("mlflow"))
    assert str(client.get_model_version_by_alias("mini-model", "champion").version) == "1"
    exp = client.get_experiment_by_name("mini")
    assert exp.artifact_location.startswith((tmp_path / "artifacts").as_uri())
    assert {r.info.run_name for r in client.search_runs([exp.experiment_id])} >= {"sweep", "train", "eval", "register"}
    # Optuna: the sweep's study and its trials
    studies = optuna.get_all_study_summaries(storage=pg.url("optuna"))
    assert len(studies) == 1 and studies[0].n_trials == 2
    # and nothing of it went to the SQLite defaults under the state root
    state = Path(w["env"]["FINETUNE_HOME"])
    assert not (state / "mlflow" / "mlflow.db").exists() and not (state / "optuna" / "optuna.db").exists()
    assert not list((state / "dagster").glob("**/*.db"))
