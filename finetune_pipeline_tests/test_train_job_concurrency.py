"""Tier 3: two train runs of one pipeline started at the same moment (the schedule and a person), as two processes
on one Dagster instance configured by the shipped dagster.yaml (SQLite): the adapter steps take the training pool's
one slot in turn, one adapter is trained, one version is registered."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_pipeline_tests.conftest import REPO, chat_row, prepared_splits

pytestmark = pytest.mark.e2e

SPEC = """
name: pool
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, dtype: float32, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
training: {{max_steps: 2, per_device_train_batch_size: 4, learning_rate: 0.005, max_length: 96}}
runtime: {{logging_steps: 1, save_steps: 0, calibration_steps: 0, eos_check_samples: 0}}
evaluation: {{primary_metric: perplexity, metrics: [perplexity], max_samples: 4, max_new_tokens: 4, batch_size: 4,
             bootstrap_resamples: 100, forgetting: {{enabled: false}}}}
registry: {{model_name: pool-model, min_improvement_over_base: -1000000}}
release: {{enabled: false}}
"""

RUN = """
import sys
from pathlib import Path
import dagster as dg
from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.spec import parse_spec

spec_file, root, who = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
spec = parse_spec(spec_file.read_text(), path=spec_file)
wanted = {"adapter", "eval_report", "registered_model"}
assets = [a for a in build_pipeline_defs(spec).assets if a.key.path[-1] in wanted]
resources = {
    "state": StateStore(root=str(root / "state")),
    "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
    "optuna": OptunaStorage(),
}
with dg.DagsterInstance.get() as instance:
    res = dg.materialize(assets, instance=instance, resources=resources, tags={"started_by": who}, raise_on_error=False)
print("RUN", who, res.run_id, res.success, flush=True)
"""


def test_two_train_runs_at_once_train_one_adapter_and_register_one_version(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    from mlflow import MlflowClient

    spec_file = tmp_path / "pool.yaml"
    spec_file.write_text(SPEC.format(model=tiny_model))
    rows = [json.dumps(chat_row(i)["messages"]) for i in range(18)]
    prepared_splits(tmp_path, "pool", tiny_model, rows, 12, 2)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(REPO),  # the shipped dagster.yaml: its pool limit, storage under FINETUNE_DAGSTER_DIR
        "FINETUNE_DAGSTER_DIR": str(tmp_path / "dagster"),
        "FINETUNE_HOME": str(tmp_path / "state"),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    # an existing deployment: the MLflow store is there before the two runs (two processes opening a fresh one at
    # once: test_tracker)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments()
    # ... and so is the Dagster instance (its SQLite storage, created by the daemon or the UI that launches runs;
    # two processes creating it at the same moment race in Dagster's own alembic stamp)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    monkeypatch.setenv("FINETUNE_DAGSTER_DIR", env["FINETUNE_DAGSTER_DIR"])
    with dg.DagsterInstance.get() as inst:
        inst.get_runs(limit=1)
    script = tmp_path / "run.py"
    script.write_text(RUN)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(spec_file), str(tmp_path), who],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for who in ("schedule", "person")
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    lines = [next((ln for ln in o.splitlines() if ln.startswith("RUN ")), o[-3000:]) for o in outs]
    assert all(ln.split()[-1] == "True" for ln in lines), lines
    run_ids = [ln.split()[2] for ln in lines]

    with dg.DagsterInstance.get() as inst:
        spans = {}
        reused = {}
        for rid in run_ids:
            events = inst.all_logs(rid)
            start = next(
                e.timestamp
                for e in events
                if e.step_key
                and "adapter" in e.step_key
                and e.dagster_event
                and e.dagster_event.event_type_value == "STEP_START"
            )
            end = next(
                e.timestamp
                for e in events
                if e.step_key
                and "adapter" in e.step_key
                and e.dagster_event
                and e.dagster_event.event_type_value == "STEP_SUCCESS"
            )
            spans[rid] = (start, end)
            mat = next(
                e.dagster_event.step_materialization_data.materialization
                for e in events
                if e.dagster_event
                and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
                and e.dagster_event.asset_key.path[-1] == "adapter"
            )
            reused[rid] = mat.metadata["reused"].value
    (a0, a1), (b0, b1) = sorted(spans.values())
    assert a1 <= b0, f"the two adapter steps overlapped: {spans}"  # one waited for the pool's slot
    assert sorted(reused.values()) == [False, True]  # one trained, the other found its adapter
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [str(v.version) for v in client.search_model_versions("name = 'pool-model'")] == ["1"]
    exp = client.get_experiment_by_name("pool")
    assert len([r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "train"]) == 1
    adapters = [p for p in (tmp_path / "state" / "pipelines" / "pool" / "adapters").iterdir() if p.is_dir()]
    assert len([p for p in adapters if not p.name.endswith(".partial")]) == 1
