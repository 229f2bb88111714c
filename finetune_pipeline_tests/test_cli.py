"""Tier 3: the real CLI (`finetune-pipeline`, `dagster asset materialize`, `dagster job execute`) on a small spec,
with real SQLite-backed Dagster, MLflow and Optuna under a temporary state root. Asserts behaviour, not exit codes."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from finetune_pipeline.data.demo_tickets import write_demo_drops
from finetune_pipeline_tests.conftest import REPO

pytestmark = pytest.mark.e2e

SPEC = """
name: mini
source: {{incoming_dir: {incoming}, settle_seconds: 0}}
cleaning: {{max_rejection_rate: 0.05}}
split: {{validation_fraction: 0.1, test_fraction: 0.1}}
model: {{base: {model}, method: lora, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
training: {{max_steps: 10, per_device_train_batch_size: 4, learning_rate: 0.005, max_length: 256,
           max_eval_samples: 16, seed: 7}}
runtime: {{logging_steps: 2}}
sweep:
  enabled: true
  n_trials: 2
  max_steps: 2
  pruner: none
  search_space:
    learning_rate: {{type: float, low: 0.002, high: 0.01, log: true}}
evaluation: {{primary_metric: perplexity, max_samples: 6, max_new_tokens: 8, batch_size: 6, n_report_samples: 2}}
registry: {{model_name: mini-model}}
"""


def make_world(root: Path, tiny_model: Path, spec: str = SPEC) -> dict:
    """Two small drops taken from the demo files (same faults and duplicates, fewer rows) and a spec folder."""
    drops = write_demo_drops(root / "all")
    incoming = root / "incoming"
    incoming.mkdir()
    # two small drops taken from the demo files (same faults and duplicates, fewer rows)
    for i, p in enumerate(drops):
        lines = p.read_text().splitlines(keepends=True)
        (incoming / f"drop{i}.jsonl").write_text("".join(lines[:160]))
    (root / "specs").mkdir()
    (root / "specs" / "mini.yaml").write_text(spec.format(incoming=incoming, model=tiny_model))
    # MLflow's own variables are not inherited: mlflow.set_tracking_uri in an earlier in-process test exports one
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "FINETUNE_HOME": str(root / "state"),
        "FINETUNE_SPECS": str(root / "specs"),
        "DAGSTER_HOME": str(REPO),
        "FINETUNE_DAGSTER_DIR": str(root / "state" / "dagster"),
    }
    return {"root": root, "env": env, "incoming": incoming, "model": tiny_model}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    return make_world(tmp_path_factory.mktemp("e2e"), tiny_model)


def cli(world: dict, *args: str) -> str:
    out = subprocess.run(list(args), cwd=REPO, env=world["env"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return out.stdout + out.stderr


def dagster_cli(world: dict, *args: str) -> str:
    return cli(world, sys.executable, "-m", "dagster", *args, "-m", "finetune_pipeline.definitions")


def ingest_all(world: dict) -> list[str]:
    out = cli(world, sys.executable, "-m", "finetune_pipeline.cli", "register-drops")
    keys = [ln.split("registered drop ")[1].split()[0] for ln in out.splitlines() if "registered drop" in ln]
    for k in keys:
        dagster_cli(
            world, "asset", "materialize", "--select", "mini/raw_dataset,mini/cleaned_dataset", "--partition", k
        )
    return keys


@pytest.fixture(scope="module")
def trained(world: dict) -> dict:
    """Ingest both drops and run the train job once; what it produced is kept as it was right after, so a test
    that runs the job again does not change what another test reads."""
    keys = ingest_all(world)
    assert len(keys) == 2
    log = dagster_cli(world, "job", "execute", "-j", "mini_train")
    with instance_of(world) as instance:
        cleaned = instance.get_materialized_partitions(dg.AssetKey(["mini", "cleaned_dataset"]))
        names = ("dataset_splits", "adapter", "token_stats", "eval_report", "registered_model")
        return {"keys": keys, "log": log, "cleaned": cleaned, **{n: latest(instance, n) for n in names}}


@pytest.fixture()
def env(world: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    for k in ("FINETUNE_HOME", "FINETUNE_SPECS", "DAGSTER_HOME", "FINETUNE_DAGSTER_DIR"):
        monkeypatch.setenv(k, world["env"][k])
    return world


@contextlib.contextmanager
def instance_of(world: dict) -> Iterator[dg.DagsterInstance]:
    """The world's Dagster instance (dagster.yaml in DAGSTER_HOME, storage under its state root)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("FINETUNE_HOME", "FINETUNE_SPECS", "DAGSTER_HOME", "FINETUNE_DAGSTER_DIR"):
            mp.setenv(k, world["env"][k])
        with dg.DagsterInstance.get() as instance:
            yield instance


def mlflow_client(world: dict):  # type: ignore[no-untyped-def]
    import mlflow

    uri = f"sqlite:///{world['root'] / 'state' / 'mlflow' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def mlflow_at(world: dict) -> Iterator[None]:
    """MLflow's global URIs pointed at the world's store for a block, then put back (for mlflow.* loaders)."""
    import mlflow

    uri = f"sqlite:///{world['root'] / 'state' / 'mlflow' / 'mlflow.db'}"
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
        for k, v in saved.items():  # set_tracking_uri also exports the URI to the environment: put it back
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def latest(instance: dg.DagsterInstance, name: str) -> dict:
    ev = instance.get_latest_materialization_event(dg.AssetKey(["mini", name]))
    assert ev is not None, f"mini/{name} was never materialized"
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()} | {
        "_version": ev.asset_materialization.tags.get("dagster/data_version"),
        "_run": ev.run_id,
    }


def test_pipeline_trains_evaluates_and_registers(trained: dict, env: dict) -> None:
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from finetune_pipeline.models.merge import max_logit_diff, tuned_model
    from finetune_pipeline.spec import load_spec
    from finetune_pipeline.training.configs import lora_config

    assert trained["cleaned"] == set(trained["keys"])
    splits = trained["dataset_splits"]
    assert splits["train_rows"] > 200 and splits["test_rows"] > 10 and splits["cross_drop_duplicates"] > 0
    adapter = trained["adapter"]
    assert adapter["reused"] is False and adapter["steps"] == 10

    # loss logged to MLflow and falling
    client = mlflow_client(env)
    exp = client.get_experiment_by_name("mini")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"sweep", "trial-0", "trial-1", "train", "eval", "register"} <= set(runs)
    history = client.get_metric_history(adapter["mlflow_run_id"], "train_loss")
    assert len(history) == 5 and history[-1].value < history[0].value
    # sweep trials are nested runs under the sweep run
    assert runs["trial-0"].data.tags["mlflow.parentRunId"] == runs["sweep"].info.run_id

    # every LoRA weight changed: B starts at zero, A differs from its seeded initialisation
    spec = load_spec(Path(env["env"]["FINETUNE_SPECS"]) / "mini.yaml").spec
    weights = load_file(Path(adapter["path"]) / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(env["model"])
    set_seed(spec.training.seed)
    init = {
        k.replace(".default", ""): v
        for k, v in get_peft_model(base, lora_config(spec.model.lora)).state_dict().items()
        if "lora_" in k
    }
    assert weights and set(weights) == set(init)
    for k, w in weights.items():
        assert not torch.equal(w, init[k]), f"{k} did not change"

    # token statistics of the splits against training.max_length
    tokens = trained["token_stats"]
    assert tokens["train_tokens"]["rows"] == splits["train_rows"] and tokens["train_tokens"]["p50"] > 10
    assert tokens["max_length"] == spec.training.max_length and "data:image/png;base64" in tokens["histogram"]

    # eval report and the blocking gate
    report = trained["eval_report"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert "| perplexity |" in report["report"]
    with instance_of(env) as instance:
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(["mini", "eval_report"]), "tuned_beats_base"), limit=50
        )
    assert [c.status.value for c in checks if c.run_id == report["_run"]] == ["SUCCEEDED"]

    # registered version with aliases, lineage tags, dataset digests equal to Dagster's
    reg = trained["registered_model"]
    mv = client.get_model_version_by_alias("mini-model", "champion")
    assert str(mv.version) == reg["version"] == "1" and reg["promoted"] is True
    assert set(reg["aliases"]) == {"challenger", "champion"}
    t = mv.tags
    for tag in ("train_run_id", "sweep_run_id", "eval_run_id", "register_run_id"):
        assert t[f"finetune.{tag}"] in {r.info.run_id for r in runs.values()}
    assert t["finetune.splits_version"] == splits["_version"]
    assert {t[f"finetune.dataset_digest.{s}"] for s in ("train", "validation", "test")} == {
        splits["train_digest"],
        splits["validation_digest"],
        splits["test_digest"],
    }
    assert set(t["finetune.drops"].split(",")) == set(trained["keys"])
    train_run = client.get_run(t["finetune.train_run_id"])
    assert train_run.data.tags["dagster.run_id"] == adapter["_run"]
    assert train_run.data.tags["dagster.asset_key"] == "mini/adapter"
    assert train_run.data.tags["finetune.spec_hash"]
    inputs = {d.dataset.name: d.dataset.digest for d in train_run.inputs.dataset_inputs}
    assert inputs == {
        "mini/dataset_splits/train": splits["train_digest"],
        "mini/dataset_splits/validation": splits["validation_digest"],
    }

    # the registered model reloads and gives the trained adapter's logits
    from finetune_pipeline.tracking.mlflow_store import load_registered

    with mlflow_at(env):
        served, _ = load_registered("mini-model", str(mv.version))
    tok = AutoTokenizer.from_pretrained(adapter["path"])
    diff = max_logit_diff(tuned_model(str(env["model"]), spec.model, adapter["path"]), served, tok)
    assert diff < 1e-4

    # lineage command follows the champion back to its runs and datasets
    out = cli(env, sys.executable, "-m", "finetune_pipeline.cli", "lineage", "models:/mini-model@champion")
    chain = json.loads(out[out.index("{") :])
    assert chain["runs"]["train_run_id"]["datasets"][0]["digest"] in {
        splits["train_digest"],
        splits["validation_digest"],
    }


def test_unchanged_data_does_not_retrain_and_new_drop_triggers_schedule(trained: dict, env: dict) -> None:
    from finetune_pipeline.definitions import build_definitions
    from finetune_pipeline.defs.resources import StateStore

    client = mlflow_client(env)
    exp = client.get_experiment_by_name("mini")
    n_runs = len(client.search_runs([exp.experiment_id]))
    versions = len(client.search_model_versions("name = 'mini-model'"))
    dagster_cli(env, "job", "execute", "-j", "mini_train")
    with instance_of(env) as instance:
        adapter = latest(instance, "adapter")
        sweep = latest(instance, "hyperparameter_sweep")
    assert adapter["reused"] is True and adapter["adapter_key"] == trained["adapter"]["adapter_key"]
    assert sweep["trials_run_now"] == 0 and sweep["reused"] is True
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == n_runs, "unchanged data must not start a sweep, trial, train, eval or register run"
    assert len(client.search_model_versions("name = 'mini-model'")) == versions

    defs = build_definitions(Path(env["env"]["FINETUNE_SPECS"]))
    # resolve with a live instance in Dagster's context variable (one left by an earlier test may be collected)
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test(temp_dir=tmp):
        schedule = defs.resolve_schedule_def("mini_retrain_schedule")
    state = {"state": StateStore()}
    with instance_of(env) as instance:
        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources=state))
    assert not tick.run_requests and "unchanged" in tick.skip_message

    # a new drop lands: the schedule now asks for a retrain
    lines = sorted((env["root"] / "all").glob("*.jsonl"))[0].read_text().splitlines(keepends=True)
    (env["incoming"] / "drop_new.jsonl").write_text("".join(lines[400:480]))
    assert len(ingest_all(env)) == 1
    with instance_of(env) as instance:
        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources=state))
    assert len(tick.run_requests) == 1


def test_failed_gate_never_registers(tmp_path: Path, tiny_model: Path) -> None:
    """A bar the tuned model cannot pass: the blocking check fails the run after training and before registration."""
    spec = SPEC.replace(
        "registry: {{model_name: mini-model}}",
        "registry: {{model_name: mini-model, min_improvement_over_base: 1.0e+9}}",
    )
    assert spec != SPEC
    w = make_world(tmp_path, tiny_model, spec)
    assert len(ingest_all(w)) == 2
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "job", "execute", "-m", "finetune_pipeline.definitions", "-j", "mini_train"],
        cwd=REPO,
        env=w["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode != 0
    with instance_of(w) as instance:
        gate = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey(["mini", "eval_report"]), "tuned_beats_base")]
        )
        assert [e.status.value for e in gate.values()] == ["FAILED"]
        assert latest(instance, "adapter")["reused"] is False  # it trained: only the gate stopped it
        assert instance.get_latest_materialization_event(dg.AssetKey(["mini", "registered_model"])) is None
    client = mlflow_client(w)
    assert client.search_model_versions("name = 'mini-model'") == []
