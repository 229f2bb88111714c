"""Tier 2: the definitions load fast and light, several specs give several prefixed groups."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from finetune_pipeline.definitions import build_definitions

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
HEAVY = ["torch", "transformers", "peft", "trl", "bitsandbytes", "mlflow", "optuna", "datasets", "matplotlib"]


def _spec(name: str, sweep: bool) -> str:
    extra = (
        "sweep: {enabled: true, search_space: {learning_rate: {type: float, low: 0.0001, high: 0.001}}}\n"
        if sweep
        else ""
    )
    return f"name: {name}\nsource: {{incoming_dir: in_{name}}}\nregistry: {{model_name: {name}-m}}\n{extra}"


def test_two_specs_two_independent_groups(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(_spec("alpha", sweep=True))
    (tmp_path / "b.yaml").write_text(_spec("beta", sweep=False))
    defs = build_definitions(tmp_path)
    # resolve against a live instance: Dagster keeps the last instance's state storage in a context variable,
    # and one left by an earlier test may already be garbage-collected
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")):
        graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    stages = [
        "raw_dataset",
        "cleaned_dataset",
        "dataset_splits",
        "token_stats",
        "data_readiness",
        "base_model",
        "adapter",
        "eval_report",
        "registered_model",
        "release",
    ]
    assert {f"alpha/{s}" for s in stages} | {"alpha/hyperparameter_sweep"} <= keys
    assert {f"beta/{s}" for s in stages} <= keys and "beta/hyperparameter_sweep" not in keys
    for k in graph.get_all_asset_keys():
        node = graph.get(k)
        assert node.group_name == k.path[0]
        assert node.description and "\n" not in node.description.strip()
    assert graph.get(dg.AssetKey(["alpha", "adapter"])).parent_keys >= {
        dg.AssetKey(["alpha", "hyperparameter_sweep"]),
        dg.AssetKey(["alpha", "data_readiness"]),  # its blocking check keeps training from starting
    }
    names = {j.name for j in defs.resolve_all_job_defs()}
    assert {"alpha_ingest", "alpha_train", "beta_ingest", "beta_train"} <= names
    assert defs.resolve_sensor_def("alpha_incoming_sensor") and defs.resolve_schedule_def("beta_retrain_schedule")
    checks = {c.name for c in graph.asset_check_keys if c.asset_key.path[0] == "alpha"}
    assert {
        "rows_accounted",
        "rejection_rate",
        "chat_schema",
        "no_split_overlap",
        "no_test_leak",
        "label_conflicts",
        "spec_minimums",
        "enough_train_rows",
        "test_resolves_gate",
        "label_balance",
        "budget_covers_an_epoch",
        "drift",
        "few_truncated",
        "end_of_turn_contract",
        "tuned_beats_base",
        "no_forgetting",
        "generations_end",
        "reload_same_logits",
        "artifacts_match_evaluated",
    } == checks


def test_import_does_not_load_torch_and_cli_validates(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys, finetune_pipeline.definitions; print(sorted(set({HEAVY!r}) & set(sys.modules)))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(REPO),
        "FINETUNE_HOME": str(tmp_path),
        "FINETUNE_DAGSTER_DIR": str(tmp_path / "dagster"),
    }
    val = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "finetune_pipeline.definitions"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert val.returncode == 0, val.stdout + val.stderr
    assert "All code locations passed validation" in val.stdout + val.stderr


def test_bad_spec_is_not_loaded_and_reported_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "name: x\nsource: {incoming_dir: in}\nregistry: {model_name: m}\ntraining:\n  max_steps: -3\n"
    )
    defs = build_definitions(tmp_path)  # a bad spec no longer takes the code location down
    [spec] = [a for a in defs.assets or [] if isinstance(a, dg.AssetSpec)]
    assert spec.key == dg.AssetKey(["spec_errors", "bad"])
    assert f"{tmp_path / 'bad.yaml'}:5: training.max_steps: must be > 0" in (spec.description or "")


def test_a_broken_spec_is_reported_and_the_others_load(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(_spec("alpha", sweep=False))
    (tmp_path / "broken-one.yaml").write_text("name: broken\nsource: {incoming_dir: in}\nregistry: {model_name: 'x}\n")
    defs = build_definitions(tmp_path)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")):
        graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert "alpha/cleaned_dataset" in keys and "spec_errors/broken_one" in keys
    desc = graph.get(dg.AssetKey(["spec_errors", "broken_one"])).description
    assert "broken-one.yaml:3: not valid YAML" in desc
    assert defs.resolve_sensor_def("alpha_incoming_sensor")
    env = {**os.environ, "FINETUNE_SPECS": str(tmp_path), "PYTHONPATH": str(REPO), "DAGSTER_HOME": ""}
    env.pop("DAGSTER_HOME")
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-m", "finetune_pipeline.definitions"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "broken-one.yaml is broken and was skipped" in out.stderr and "not valid YAML" in out.stderr
