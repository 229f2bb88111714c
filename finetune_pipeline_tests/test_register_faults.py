"""Tier 2: registered_model when the MLflow store fails in the middle of the step, on the real SQLite store.

The store is made unavailable at a chosen moment of a real materialization: a test logger reacts to the stage's own
log line and takes an exclusive lock on the database from another connection (as a second writer, a backup or a
vacuum would), or the database refuses the champion alias write. After each fault: the step failed naming the
store; a version is absent or complete with its evidence; no alias points at a version that failed its reload; and
materializing again converges to the registry state of an undisturbed run (read with an MlflowClient pointed
explicitly at the pipeline's store)."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from finetune_pipeline_tests.conftest import chat_row, prepared_splits

pytestmark = pytest.mark.integration

NAME, MODEL = "rf", "rf-model"
SPEC = """
name: rf
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, dtype: float32, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
evaluation: {{primary_metric: perplexity, metrics: [perplexity, exact_match], max_samples: 4, max_new_tokens: 4,
             batch_size: 4, n_report_samples: 1, bootstrap_resamples: 100, forgetting: {{enabled: false}}}}
registry: {{model_name: rf-model, min_improvement_over_base: -1000000}}
"""
# differ between two runs by design: who ran it, and when
VOLATILE_TAGS = {"finetune.register_run_id", "dagster.run_id", "finetune.reload_max_logit_diff"}
EVIDENCE = "finetune.decision.promoted"
RELOAD_TOLERANCE = 1e-3


@dataclass
class World:
    spec: Any
    spec_file: Path
    template: Path  # a state root where the adapter is trained and evaluated, nothing registered
    adapter_key: str
    baseline: dict  # the registry after an undisturbed materialization


def registry_state(uri: str, name: str = MODEL) -> dict | None:
    """What the registry holds for the model, without run ids and times; None when the model does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    history = json.loads(dict(model.tags).get("finetune.champion_history", "[]"))
    versions = {}
    for mv in client.search_model_versions(f"name = '{name}'"):
        versions[str(mv.version)] = {
            "tags": {k: v for k, v in mv.tags.items() if k not in VOLATILE_TAGS},
            "description": mv.description,
        }
    return {
        "aliases": {a: str(v) for a, v in dict(model.aliases or {}).items()},
        "history": [{k: v for k, v in h.items() if k != "at"} for h in history],
        "versions": versions,
    }


def assert_same_registry(got: dict | None, want: dict, ignore: frozenset[str] = frozenset()) -> None:
    """The registry state equals the undisturbed one (tags in ``ignore`` aside); a difference names its key."""
    assert got is not None, "nothing registered"
    assert got["aliases"] == want["aliases"] and got["history"] == want["history"]
    assert got["versions"].keys() == want["versions"].keys()
    for v, w in want["versions"].items():
        g = got["versions"][v]
        keys = (g["tags"].keys() | w["tags"].keys()) - ignore
        diff = {k: (g["tags"].get(k), w["tags"].get(k)) for k in keys if g["tags"].get(k) != w["tags"].get(k)}
        assert not diff, f"v{v} tags differ (got, undisturbed): {diff}"
        assert g["description"] == w["description"], f"v{v} model cards differ"


def assert_nothing_half_done(uri: str) -> None:
    """Every version is complete with its evidence; every alias points at a version whose reload passed."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    state = registry_state(uri)
    if state is None:
        return
    for v, info in state["versions"].items():
        assert EVIDENCE in info["tags"] and "finetune.adapter_key" in info["tags"], f"v{v} lacks its evidence"
    for alias, v in state["aliases"].items():
        diff = client.get_model_version(MODEL, v).tags.get("finetune.reload_max_logit_diff")
        assert diff is not None and float(diff) < RELOAD_TOLERANCE, f"alias {alias} on v{v} (reload {diff})"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> World:
    """A trained 2-step adapter and its evaluation in a template state root; the registry an undisturbed
    materialization leaves behind."""
    from finetune_pipeline.layout import AdapterRecord
    from finetune_pipeline.spec import RuntimeSpec, TrainingSpec, parse_spec
    from finetune_pipeline.training.sft import TrainRequest, train

    root = tmp_path_factory.mktemp("regworld")
    spec_file = root / "rf.yaml"
    spec_file.write_text(SPEC.format(model=tiny_model))
    spec = parse_spec(spec_file.read_text(), path=spec_file)
    rows = [json.dumps(chat_row(i)["messages"]) for i in range(18)]
    layout = prepared_splits(root, NAME, tiny_model, rows, 12, 2)
    key = "k1"
    train(
        TrainRequest(
            base_path=str(tiny_model),
            model=spec.model,
            training=TrainingSpec(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, max_length=96),
            runtime=RuntimeSpec(logging_steps=1, save_steps=0, calibration_steps=0, eos_check_samples=0),
            train_messages=rows[:12],
            eval_messages=[],
            output_dir=layout.adapter(key),
        ),
        log=lambda m: None,
    )
    AdapterRecord(
        adapter_key=key,
        path=str(layout.adapter(key)),
        train_run_id="",
        spec_hash=spec.spec_hash,
        code_version="c",
        base_weights_digest="w",
        splits_version="v",
        split_digests={"train": "train"},
        drops=["d"],
        params={},
    ).save(layout.adapter_record(key))
    w = World(spec, spec_file, root / "state", key, {})
    base = Stage(w, root / "baseline")
    res = base.materialize()
    assert res.success
    w.baseline = registry_state(base.uri) or {}
    assert w.baseline["aliases"] == {"challenger": "1", "champion": "1"}
    # the template keeps the evaluation (and its caches): the tests' steps reuse it, as a retry would
    shutil.rmtree(w.template)
    shutil.move(root / "baseline" / "state", w.template)
    return w


class Stage:
    """One test's copy of the world: its own state root, MLflow store (SQLite) and Dagster instance."""

    def __init__(self, world: World, folder: Path, tracking_uri: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.world, self.folder = world, folder
        shutil.copytree(world.template, folder / "state")
        (folder / "state" / "pipelines" / NAME / "registration.json").unlink(missing_ok=True)
        self.db = folder / "mlflow.db"
        self.uri = tracking_uri or f"sqlite:///{self.db}"
        (folder / "dagster").mkdir(exist_ok=True)
        self.instance = dg.instance_for_test(temp_dir=str(folder / "dagster")).__enter__()
        self.instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=dg.AssetKey([NAME, "adapter"]), tags={"dagster/data_version": world.adapter_key}
            )
        )

    def materialize(self, hook: Callable[[str], None] | None = None) -> dg.ExecuteInProcessResult:
        """eval_report (reused from the template) and registered_model, as one run; ``hook`` sees every log line."""
        return materialize_release(self.world.spec, self.folder, self.uri, self.instance, hook)

    def spawn(self) -> subprocess.Popen:
        """The same run in a process of its own (to be killed)."""
        code = (
            "import sys; from finetune_pipeline_tests.test_register_faults import release_in_process; "
            "release_in_process(*sys.argv[1:])"
        )
        return subprocess.Popen(
            [sys.executable, "-c", code, str(self.world.spec_file), str(self.folder), self.uri],
            stdout=(self.folder / "child.log").open("w"),
            stderr=subprocess.STDOUT,
        )

    def close(self) -> None:
        self.instance.__exit__(None, None, None)


def materialize_release(
    spec: Any, folder: Path, uri: str, instance: dg.DagsterInstance, hook: Callable[[str], None] | None = None
) -> dg.ExecuteInProcessResult:
    from finetune_pipeline.defs.pipeline import build_pipeline_defs
    from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore

    wanted = {"eval_report", "registered_model"}
    assets = [a for a in build_pipeline_defs(spec).assets if a.key.path[-1] in wanted]  # type: ignore[union-attr]

    class Hook(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hook is not None:
                hook(record.getMessage())

    @dg.logger
    def hooked(_: Any) -> logging.Logger:
        lg = logging.Logger("fault-hook", level=logging.DEBUG)
        lg.addHandler(Hook())
        return lg

    job = dg.define_asset_job("release", selection=dg.AssetSelection.assets(*[a.key for a in assets]))
    defs = dg.Definitions(
        assets=assets,
        jobs=[job],
        loggers={"hook": hooked, "console": dg.colored_console_logger},
        resources={
            "state": StateStore(root=str(folder / "state")),
            "mlflow_tracking": MlflowTracking(tracking_uri=uri, artifact_root=str(folder / "artifacts")),
            "optuna": OptunaStorage(),
        },
    )
    job_def = defs.resolve_job_def("release")
    loggers = {"loggers": {"hook": {}, "console": {}}} if hook is not None else None  # console: the run log as usual
    return job_def.execute_in_process(instance=instance, raise_on_error=False, run_config=loggers)


def release_in_process(spec_file: str, folder: str, uri: str) -> None:
    """Entry point of the spawned step process: the release run on the test's instance (SQLite in its folder)."""
    from dagster._core.instance.ref import InstanceRef

    from finetune_pipeline.spec import parse_spec

    spec = parse_spec(Path(spec_file).read_text(), path=Path(spec_file))
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(Path(folder) / "dagster"))) as instance:
        res = materialize_release(spec, Path(folder), uri, instance, hook=lambda m: print(m, flush=True))
    print("RESULT", res.success, flush=True)


def failure_message(res: dg.ExecuteInProcessResult) -> str:
    failed = [e for e in res.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed, "the step should have failed"
    return str(failed[0].step_failure_data.error)


class Locker:
    """An exclusive lock on the SQLite database from another connection, taken when a log line appears."""

    def __init__(self, db: Path, when: str) -> None:
        self.db, self.when, self.conn, self.taken_at = db, when, None, ""

    def __call__(self, message: str) -> None:
        if self.conn is None and self.when in message:
            self.conn = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False)
            self.conn.execute("BEGIN EXCLUSIVE")
            self.taken_at = message

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()


@pytest.mark.parametrize(
    "moment",
    [
        "logging the merged chat model",  # registering: the model is being logged, no version yet
        "reloaded from the registry",  # the version exists and passed its reload: evidence and aliases next
    ],
)
def test_store_locked_during_registration_converges(world: World, tmp_path: Path, moment: str) -> None:
    stage = Stage(world, tmp_path)
    try:
        lock = Locker(stage.db, moment)
        res = stage.materialize(hook=lock)
        lock.release()
        assert lock.taken_at, f"the stage never logged {moment!r}"
        assert not res.success
        msg = failure_message(res)
        assert "MLflow store" in msg and str(stage.db) in msg and "locked" in msg
        assert "materialize" in msg  # says how to continue
        assert_nothing_half_done(stage.uri)
        after_fault = registry_state(stage.uri)
        if moment.startswith("logging"):
            assert after_fault is None or after_fault["versions"] == {}
        else:
            assert list(after_fault["versions"]) == ["1"] and after_fault["aliases"] == {}  # type: ignore[index]
        again = stage.materialize()
        assert again.success
        assert_same_registry(registry_state(stage.uri), world.baseline)  # same as if nothing had happened
        assert_nothing_half_done(stage.uri)
    finally:
        stage.close()


def test_champion_write_refused_then_converges(world: World, tmp_path: Path) -> None:
    """The database refuses the champion alias (a trigger aborts that one write): the challenger is set, the
    champion move is not half-made, and the rerun completes it once, history included."""
    stage = Stage(world, tmp_path)
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=stage.uri, registry_uri=stage.uri).search_registered_models()  # creates the schema
        with sqlite3.connect(stage.db) as conn:
            for op in ("INSERT", "UPDATE"):
                conn.execute(
                    f"CREATE TRIGGER refuse_champion_{op.lower()} BEFORE {op} ON registered_model_aliases "
                    "WHEN NEW.alias = 'champion' BEGIN SELECT RAISE(ABORT, 'database is locked (fault injected)'); END"
                )
        res = stage.materialize()
        assert not res.success
        assert "MLflow store" in failure_message(res)
        held = registry_state(stage.uri)
        assert held is not None and "champion" not in held["aliases"]
        assert_nothing_half_done(stage.uri)
        with sqlite3.connect(stage.db) as conn:
            conn.execute("DROP TRIGGER refuse_champion_insert")
            conn.execute("DROP TRIGGER refuse_champion_update")
        assert stage.materialize().success
        assert_same_registry(registry_state(stage.uri), world.baseline)
    finally:
        stage.close()


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if ready():
            assert proc.poll() is None, "the step finished before the kill"
            proc.kill()  # SIGKILL
            proc.wait(timeout=30)
            return
        assert proc.poll() is None, "the step process ended before the moment to kill it"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the moment to kill never came")


def _versions(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        return list(client.search_model_versions(f"name = '{MODEL}'"))
    except Exception:  # the schema may not exist yet
        return []


def test_kill_9_during_registration_converges_without_a_second_version(world: World, tmp_path: Path) -> None:
    """Killed right after the version was created (before its reload check and aliases): the rerun finds it by
    adapter key, finishes it, and registers nothing twice."""
    stage = Stage(world, tmp_path)
    try:
        proc = stage.spawn()
        _kill_when(proc, lambda: len(_versions(stage.uri)) > 0)
        held = registry_state(stage.uri)
        assert held is not None and list(held["versions"]) == ["1"]
        assert_nothing_half_done(stage.uri)
        assert stage.materialize().success
        assert_same_registry(registry_state(stage.uri), world.baseline)
    finally:
        stage.close()


def test_kill_9_during_evaluation_converges(world: World, tmp_path: Path) -> None:
    """Killed while the evaluation generates (its MLflow run is open): nothing is registered; the rerun evaluates
    again and registers one version like an undisturbed run."""
    from mlflow import MlflowClient

    stage = Stage(world, tmp_path)
    shutil.rmtree(tmp_path / "state" / "pipelines" / NAME / "eval")  # evaluate for real this time
    client = MlflowClient(tracking_uri=stage.uri, registry_uri=stage.uri)

    def evaluating() -> bool:
        exp = client.get_experiment_by_name(NAME) if stage.db.exists() else None
        runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'eval'") if exp else []
        return bool(runs)

    try:
        proc = stage.spawn()
        _kill_when(proc, evaluating)
        assert registry_state(stage.uri) is None or _versions(stage.uri) == []
        assert stage.materialize().success
        # a new evaluation run, with the same numbers
        assert_same_registry(registry_state(stage.uri), world.baseline, frozenset({"finetune.eval_run_id"}))
    finally:
        stage.close()


class PostgresServer:
    """A throwaway PostgreSQL server on 127.0.0.1 that the test can stop and start again (as in test_postgres.py)."""

    def __init__(self, folder: Path) -> None:
        import os

        from finetune_pipeline_tests.test_postgres import PG_BIN, _free_port

        assert PG_BIN is not None
        self.bin, self.folder, self.port = PG_BIN, folder, _free_port()
        folder.mkdir(parents=True)
        folder.chmod(0o777)
        folder.parent.chmod(0o755)
        self.as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
        self._run("initdb", "-D", str(folder / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.as_user, str(self.bin / tool), *args], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.folder} -h 127.0.0.1"
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-o", opts, "-l", str(self.folder / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "immediate", "-w", "stop")

    def database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"  # the driver the profile names


@pytest.mark.e2e
def test_postgres_stopped_during_the_alias_moves_converges(world: World, tmp_path: Path) -> None:
    """The PostgreSQL profile: the server is stopped (immediate shutdown) right after the version passed its reload,
    before its evidence and aliases are written; started again, the rerun converges to the undisturbed state."""
    from finetune_pipeline_tests.test_postgres import PG_BIN

    if PG_BIN is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    import tempfile

    server = PostgresServer(Path(tempfile.mkdtemp(prefix="finetune-pg-")) / "pg")  # reachable by `nobody`
    stage = Stage(world, tmp_path / "run", tracking_uri=server.database("mlflow_rf"))
    stopped: list[str] = []

    def stop_server(message: str) -> None:
        if not stopped and "reloaded from the registry" in message:
            server.stop()
            stopped.append(message)

    try:
        res = stage.materialize(hook=stop_server)
        assert stopped and not res.success
        msg = failure_message(res)
        assert "MLflow store postgresql+psycopg2://postgres@127.0.0.1" in msg and "materialize" in msg
        server.start()
        assert_nothing_half_done(stage.uri)
        assert list(registry_state(stage.uri)["versions"]) == ["1"]  # type: ignore[index]
        assert stage.materialize().success
        assert_same_registry(registry_state(stage.uri), world.baseline)
    finally:
        stage.close()
        try:
            server.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(server.folder.parent, ignore_errors=True)
