"""Tier 3: the `dg` CLI as the README uses it (no SupersessionWarning), and the FineTunePipeline component in a new
dg project of a Dagster user: `dg scaffold defs`, `dg check defs`, `dg launch` of the starter's ingest assets, and
`dg check yaml` naming the field and line of a broken defs.yaml."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from examples.demo_tickets import write_demo_drops
from finetune_pipeline.data.drops import drop_key
from finetune_pipeline_tests.conftest import REPO
from finetune_pipeline_tests.test_cli import DG

pytestmark = pytest.mark.e2e

PYPROJECT = """\
[project]
name = "starter_proj"
version = "0.0.1"

[tool.dg]
directory_type = "project"

[tool.dg.project]
root_module = "starter_proj"
"""
DEFINITIONS = """\
from pathlib import Path

import dagster as dg

defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
"""


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "FINETUNE_HOME": str(tmp / "state"),
        "FINETUNE_DAGSTER_DIR": str(tmp / "state" / "dagster"),
        "DAGSTER_HOME": str(REPO),
        **extra,
    }


def dg_run(cwd: Path, env: dict[str, str], *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-c", DG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    text = out.stdout + out.stderr
    assert (out.returncode == 0) == ok, f"dg {' '.join(args)} -> {out.returncode}:\n{text[-4000:]}"
    assert "SupersessionWarning" not in text, text[-3000:]
    return out


def test_readme_dg_commands_work_without_supersession_warnings(tmp_path: Path) -> None:
    env = env_for(tmp_path, FINETUNE_SPECS=str(REPO / "specs"))
    checked = dg_run(REPO, env, "check", "defs")
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr
    listed = json.loads(dg_run(REPO, env, "list", "defs", "--json").stdout)
    assets = {a["asset_key"] for a in listed["assets"]}
    assert {"ticket_triage/raw_dataset", "ticket_triage/adapter", "ticket_triage/registered_model"} <= assets
    assert {j["name"] for j in listed["jobs"]} >= {"ticket_triage_ingest", "ticket_triage_train"}
    # `dg launch` runs for real in test_cli.py and below; `dg dev` (a server) only by its help here
    assert "Start a local instance of Dagster" in dg_run(REPO, env, "dev", "--help").stdout


def test_scaffolded_pipeline_checks_and_ingests_in_a_new_dg_project(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    (proj / "starter_proj" / "defs").mkdir(parents=True)
    (proj / "pyproject.toml").write_text(PYPROJECT)
    (proj / "starter_proj" / "__init__.py").write_text("")
    (proj / "starter_proj" / "defs" / "__init__.py").write_text("")
    (proj / "starter_proj" / "definitions.py").write_text(DEFINITIONS)
    incoming = proj / "data" / "ticket_triage" / "incoming"  # where the starter looks: the demo's data folder
    incoming.mkdir(parents=True)
    demo = write_demo_drops(tmp_path / "demo")[0].read_text().splitlines(keepends=True)
    drop = incoming / "tickets.jsonl"
    drop.write_text("".join(demo[:120]))
    env = env_for(tmp_path, PYTHONPATH=os.pathsep.join([str(proj), os.environ.get("PYTHONPATH", str(REPO))]))

    dg_run(proj, env, "scaffold", "defs", "finetune_pipeline.FineTunePipeline", "my_pipeline")
    defs_yaml = proj / "starter_proj" / "defs" / "my_pipeline" / "defs.yaml"
    assert "type: finetune_pipeline.FineTunePipeline" in defs_yaml.read_text()
    checked = dg_run(proj, env, "check", "defs")
    assert "All component YAML validated successfully" in checked.stdout
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    key = drop_key(drop)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("FINETUNE_HOME", "FINETUNE_DAGSTER_DIR", "DAGSTER_HOME"):
            mp.setenv(k, env[k])
        with dg.DagsterInstance.get() as instance:  # what the pipeline's incoming sensor does
            instance.add_dynamic_partitions("my_pipeline_drops", [key])
    dg_run(proj, env, "launch", "--assets", "my_pipeline/raw_dataset,my_pipeline/cleaned_dataset", "--partition", key)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("FINETUNE_HOME", "FINETUNE_DAGSTER_DIR", "DAGSTER_HOME"):
            mp.setenv(k, env[k])
        with dg.DagsterInstance.get() as instance:
            cleaned = dg.AssetKey(["my_pipeline", "cleaned_dataset"])
            assert instance.get_materialized_partitions(cleaned) == {key}
            checks = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [dg.AssetCheckKey(cleaned, n) for n in ("rows_accounted", "rejection_rate", "chat_schema")]
            )
            assert {e.status.value for e in checks.values()} == {"SUCCEEDED"}

    # a broken value: `dg check yaml` names the field and its line, as `python -m finetune_pipeline.spec check` does
    text = defs_yaml.read_text()
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if "lora:" in ln)
    defs_yaml.write_text(text.replace("lora: {r: 8, alpha: 16}", "lora: {r: 0, alpha: 16}"))
    out = dg_run(proj, env, "check", "yaml", ok=False)
    report = out.stdout + out.stderr
    assert f"defs.yaml:{line} - finetune_pipeline.FineTunePipeline attributes.model.lora.r" in report
    assert "0 is less than or equal to the minimum of 0" in report
