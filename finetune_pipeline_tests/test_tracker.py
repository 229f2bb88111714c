"""The Tracker (tracking/tracker.py) against real stores: SQLite Dagster and MLflow in a temporary folder, a tiny
model trained for a few steps in a real child process.

- ``registered_model`` materialised alone in a fresh process, with MLflow's environment pointing at another store,
  registers exactly one version in the pipeline's store and nothing elsewhere; a second materialisation (another
  fresh process) registers none.
- The version comes from an MLflow 3 LoggedModel whose source run is the training run (with its dataset inputs),
  linked to the train, validation and test splits (digests) through the metrics measured on them.
- `finetune-pipeline lineage` reads such a version and one registered the older way (source run = the register
  run, links in tags only).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from finetune_pipeline_tests.conftest import REPO, chat_row, local_resources, prepared_splits

pytestmark = pytest.mark.integration

SPEC = """
name: trk
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, dtype: float32, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
training: {{max_steps: 4, per_device_train_batch_size: 4, learning_rate: 0.005, max_length: 96, max_eval_samples: 4}}
runtime: {{logging_steps: 1, save_steps: 0, calibration_steps: 0, eos_check_samples: 0}}
evaluation: {{primary_metric: perplexity, max_samples: 4, max_new_tokens: 4, batch_size: 4,
             forgetting: {{enabled: false}}}}
registry: {{model_name: trk-model, min_improvement_over_base: -1000.0}}
"""

# A fresh interpreter: nothing MLflow-related was set in it before registered_model runs.
REGISTER_ALONE = """
import sys
from pathlib import Path

import dagster as dg

from finetune_pipeline.defs.release_assets import registered_model_asset
from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.spec import load_spec

tmp = Path(sys.argv[1])
spec = load_spec(tmp / "trk.yaml")
resources = {
    "state": StateStore(root=str(tmp / "state")),
    "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}"),
    "optuna": OptunaStorage(),
}
with dg.instance_for_test(temp_dir=str(tmp / "dagster")) as instance:
    res = dg.materialize([registered_model_asset(spec)], instance=instance, resources=resources)
    ev = instance.get_latest_materialization_event(dg.AssetKey(["trk", "registered_model"]))
    print("REGISTERED", res.success, ev.asset_materialization.metadata["version"].value)
"""


def _client(uri: str):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _fresh_process(tmp: Path, elsewhere: str, cwd: Path) -> str:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_TRACKING_URI": elsewhere,  # MLflow's own setting names another store
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    out = subprocess.run(
        [sys.executable, "-c", REGISTER_ALONE, str(tmp)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return next(ln for ln in out.stdout.splitlines() if ln.startswith("REGISTERED"))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """adapter and eval_report materialised in this process; then registered_model alone, twice, each time in a
    fresh process whose MLFLOW_TRACKING_URI names another SQLite store (and whose working folder is empty).
    Slow for this tier: one training child and two fresh interpreters (470 s measured on the shared, loaded 2-core
    machine; most of it is the children's imports)."""
    from finetune_pipeline.defs.release_assets import eval_report_asset
    from finetune_pipeline.defs.training_assets import adapter_asset
    from finetune_pipeline.spec import load_spec

    tmp = tmp_path_factory.mktemp("trk")
    (tmp / "trk.yaml").write_text(SPEC.format(model=tiny_model))
    spec = load_spec(tmp / "trk.yaml")
    prepared_splits(tmp, "trk", tiny_model, [json.dumps(chat_row(i)["messages"]) for i in range(40)], 32, 4)
    with dg.instance_for_test(temp_dir=str(tmp / "dagster")) as instance:
        res = dg.materialize(
            [adapter_asset(spec), eval_report_asset(spec)], instance=instance, resources=local_resources(tmp)
        )
        assert res.success
        adapter = instance.get_latest_materialization_event(dg.AssetKey(["trk", "adapter"]))
        train_run = adapter.asset_materialization.metadata["mlflow_run_id"].value
    elsewhere, cwd = f"sqlite:///{tmp / 'elsewhere' / 'mlflow.db'}", tmp / "cwd"
    (tmp / "elsewhere").mkdir()
    cwd.mkdir()
    outputs = [_fresh_process(tmp, elsewhere, cwd) for _ in range(2)]
    with dg.instance_for_test(temp_dir=str(tmp / "dagster")) as instance:
        n_materialized = len(
            instance.fetch_materializations(dg.AssetKey(["trk", "registered_model"]), limit=10).records
        )
    return {
        "tmp": tmp,
        "uri": f"sqlite:///{tmp / 'mlflow.db'}",
        "elsewhere": elsewhere,
        "cwd": cwd,
        "outputs": outputs,
        "n_materialized": n_materialized,
        "train_run": train_run,
    }


def test_registered_model_alone_in_a_fresh_process_registers_once_in_the_pipelines_store(world: dict) -> None:
    assert world["outputs"] == ["REGISTERED True 1", "REGISTERED True 1"]
    assert world["n_materialized"] == 2  # both processes materialised it ...
    client = _client(world["uri"])
    assert [str(v.version) for v in client.search_model_versions("name = 'trk-model'")] == ["1"]  # ... one version
    exp = client.get_experiment_by_name("trk")
    runs = [r.info.run_name for r in client.search_runs([exp.experiment_id])]
    assert runs.count("register") == 1, runs  # the second found the version: no run, no model
    assert len(client.search_logged_models([exp.experiment_id])) == 1
    # nothing went to the store MLflow's environment named, nor to MLflow's default store in the working folder
    db = Path(world["elsewhere"].removeprefix("sqlite:///"))
    assert not db.exists() or _client(world["elsewhere"]).search_registered_models() == []
    assert sorted(p.name for p in world["cwd"].iterdir()) == []


def test_version_comes_from_a_logged_model_with_its_run_datasets_and_scores(world: dict) -> None:
    client = _client(world["uri"])
    mv = client.get_model_version("trk-model", "1")
    assert mv.source.startswith("models:/m-")  # the UI's version page links the LoggedModel from this
    model = client.get_logged_model(mv.source.removeprefix("models:/"))
    assert str(model.status) == "READY" and model.source_run_id == world["train_run"] == mv.run_id
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "trk-model", "version": "1"}]
    assert model.params["lora.r"] == "4" and model.params["adapter_key"] == mv.tags["finetune.adapter_key"]
    # the version's source run (the training run) carries its dataset inputs, with the Dagster digests
    train = client.get_run(mv.run_id)
    assert {(d.dataset.name, d.dataset.digest) for d in train.inputs.dataset_inputs} == {
        ("trk/dataset_splits/train", "train"),
        ("trk/dataset_splits/validation", "validation"),
    }
    assert model.model_id in {o.model_id for o in train.outputs.model_outputs}
    # the model's metrics, each on the split it was measured on: train loss, validation loss, test scores
    on = {m.key: (m.dataset_name, m.dataset_digest) for m in model.metrics}
    assert on["train_loss"] == ("trk/dataset_splits/train", "train")
    assert on["eval_loss"] == ("trk/dataset_splits/validation", "validation")
    assert on["tuned.perplexity"] == ("trk/dataset_splits/test", "test")
    assert on["tuned_vs_base.perplexity.low"] == ("trk/dataset_splits/test", "test")
    eval_run = client.get_run(mv.tags["finetune.eval_run_id"])
    by_key = {m.key: m.value for m in model.metrics}
    assert by_key["tuned.perplexity"] == eval_run.data.metrics["tuned.perplexity"]
    assert model.model_id in {i.model_id for i in eval_run.inputs.model_inputs}
    # files logged under the version later (a release bundle) land in the LoggedModel's artifacts
    from finetune_pipeline.tracking.mlflow_store import TrackingTarget
    from finetune_pipeline.tracking.tracker import Tracker

    bundle = world["tmp"] / "bundle"
    bundle.mkdir(exist_ok=True)
    (bundle / "notes.txt").write_text("release notes")
    tracker = Tracker(TrackingTarget(world["uri"], None), "trk")
    assert tracker.logged_model_id("trk-model", "1") == model.model_id
    where = tracker.log_version_artifacts("trk-model", "1", bundle, "release")
    assert where == f"models:/{model.model_id}/release"
    assert Path(model.artifact_location.removeprefix("file://"), "release", "notes.txt").read_text() == "release notes"
    # linking added no point to the runs' own curves
    history = client.get_metric_history(mv.run_id, "train_loss")
    assert [h.step for h in history] == [1, 2, 3, 4]


def _old_style_version(client, name: str, tags: dict) -> str:  # type: ignore[no-untyped-def]
    """A version as this project registered them before LoggedModels carried the links: source run = a
    ``register`` run without dataset inputs, everything else in version tags."""
    exp = client.get_experiment_by_name("trk").experiment_id
    run = client.create_run(exp, run_name="register", tags={"dagster.asset_key": "trk/registered_model"})
    client.set_terminated(run.info.run_id)
    old = {**tags, "finetune.register_run_id": run.info.run_id, "finetune.adapter_key": "old-adapter"}
    mv = client.create_model_version(name, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id, tags=old)
    return str(mv.version)


def test_lineage_command_reads_new_and_old_versions(world: dict) -> None:
    client = _client(world["uri"])
    new_tags = dict(client.get_model_version("trk-model", "1").tags)
    old = _old_style_version(client, "trk-model", new_tags)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "MLFLOW_TRACKING_URI": world["uri"],  # the CLI's store: the state root's (here set explicitly)
        "FINETUNE_HOME": str(world["tmp"] / "state"),
        "DAGSTER_HOME": str(REPO),
        "FINETUNE_DAGSTER_DIR": str(world["tmp"] / "dagster"),
    }
    chains = {}
    for ver in ("1", old):
        out = subprocess.run(
            [sys.executable, "-m", "finetune_pipeline.cli", "lineage", f"models:/trk-model/{ver}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-4000:]
        chains[ver] = json.loads(out.stdout[out.stdout.index("{") :])
    new, prev = chains["1"], chains[old]
    assert new["source_run"]["run_id"] == world["train_run"]
    assert {d["digest"] for d in new["source_run"]["datasets"]} == {"train", "validation"}
    assert {(d["name"], d["digest"]) for d in new["logged_model"]["datasets"]} == {
        ("trk/dataset_splits/train", "train"),
        ("trk/dataset_splits/validation", "validation"),
        ("trk/dataset_splits/test", "test"),
    }
    assert new["runs"]["train_run_id"]["datasets"] and new["runs"]["eval_run_id"]["datasets"][0]["digest"] == "test"
    # the old version: no LoggedModel, its source run is the register run, the chain still comes from its tags
    assert "logged_model" not in prev and prev["source_run"]["name"] == "register"
    assert prev["runs"]["train_run_id"]["run_id"] == world["train_run"]
    assert {d["digest"] for d in prev["runs"]["train_run_id"]["datasets"]} == {"train", "validation"}


def test_runs_open_and_close_through_the_trackers_own_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs, nested trials, dataset inputs and statuses through the Tracker alone, with MLflow's environment
    pointing at another store: everything lands in the Tracker's store, nothing in the other one."""
    import pandas as pd

    from finetune_pipeline.tracking.mlflow_store import Lineage, TrackingTarget
    from finetune_pipeline.tracking.tracker import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    tracker = Tracker(TrackingTarget(f"sqlite:///{tmp_path / 'own.db'}", str(tmp_path / "art")), "p")
    lin = Lineage("p", "p/hyperparameter_sweep", "dagster-run", None, "cv", "sh")
    with tracker.run("sweep", lin) as sweep:
        sweep.log_dataset(pd.DataFrame({"row_id": ["a", "b"]}), "p/dataset_splits/train", "d1", "x.parquet", "training")
        for n in range(2):
            tracker.log_trial(
                sweep.run_id,
                lin,
                n,
                {"lr": 0.1 * (n + 1)},
                "COMPLETE",
                {"eval_loss": 1.0 - n, "x": float("nan")},
                [(1, 2.0), (2, 1.5)],
                "study",
            )
        sweep.log_metrics({"best_eval_loss": 0.0, "none": None})
    with pytest.raises(RuntimeError), tracker.run("train", lin):
        raise RuntimeError("training crashed")
    client = tracker.client
    runs = {r.info.run_name: r for r in client.search_runs([tracker.experiment_id])}
    assert set(runs) == {"sweep", "trial-0", "trial-1", "train"}
    assert runs["sweep"].info.status == "FINISHED" and runs["train"].info.status == "FAILED"
    for n in range(2):
        trial = runs[f"trial-{n}"]
        assert trial.data.tags["mlflow.parentRunId"] == runs["sweep"].info.run_id
        assert trial.data.tags["dagster.run_id"] == "dagster-run" and trial.data.tags["optuna.trial"] == str(n)
        assert set(trial.data.metrics) == {"eval_loss", "train_loss"}  # NaN is "not measured"
    assert [m.value for m in client.get_metric_history(runs["trial-0"].info.run_id, "train_loss")] == [2.0, 1.5]
    inputs = runs["sweep"].inputs.dataset_inputs
    assert [(i.dataset.name, i.dataset.digest, i.tags[0].value) for i in inputs] == [
        ("p/dataset_splits/train", "d1", "training")
    ]
    assert set(runs["sweep"].data.metrics) == {"best_eval_loss"}
    assert not (tmp_path / "elsewhere.db").exists()


OPEN_AT = """
import sys, time
from finetune_pipeline.tracking.mlflow_store import TrackingTarget
from finetune_pipeline.tracking.tracker import Tracker
db, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
print("EXPERIMENT", Tracker(TrackingTarget(f"sqlite:///{db}", None), "p").experiment_id, flush=True)
"""


def test_four_processes_opening_a_fresh_store_at_once_all_succeed(tmp_path: Path) -> None:
    """Four processes open the same not-yet-created SQLite store at the same instant (without the store lock,
    MLflow's schema migration failed in all 4 here: "table _alembic_tmp_model_versions already exists"): every one
    gets the pipeline's one experiment."""
    import time

    from mlflow import MlflowClient

    script = tmp_path / "open.py"
    script.write_text(OPEN_AT)
    db = tmp_path / "fresh" / "mlflow.db"
    start = time.time() + 8  # past the four interpreters' imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(db), str(start)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    ids = [next((ln.split()[1] for ln in o.splitlines() if ln.startswith("EXPERIMENT ")), o[-2000:]) for o in outs]
    assert len(set(ids)) == 1, ids
    exps = MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    assert [e.name for e in exps if e.name == "p"] == ["p"]
