"""Tier 2: ``automation.mode: declarative`` against a real (temporary, SQLite) Dagster instance: Dagster's own
AssetDaemon ticks the pipeline's automation sensors at chosen times (runs it requests are queued; the ingest ones
are launched in process), and evaluate_automation_conditions checks the blocking-check gate of the training chain."""

import datetime
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.workspace.load_target import PythonFileTarget
from dagster._daemon.asset_daemon import AssetDaemon

from finetune_pipeline.data.drops import drop_key
from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.spec import SpecError, parse_spec
from finetune_pipeline_tests.conftest import chat_row, write_jsonl

pytestmark = pytest.mark.integration

SPEC = """
name: decl
source: {{incoming_dir: {incoming}, settle_seconds: 0}}
model: {{base: {model}}}
registry: {{model_name: decl-model}}
release: {{enabled: false}}  # the release joins the training chain when on; left out to keep these ticks short
automation: {{mode: declarative, retrain_cron: "*/10 * * * *", schedule_enabled: true}}
"""
LOCATION = """
import dagster as dg
from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.spec import load_spec

resources = {{"state": StateStore(root={state!r}), "mlflow_tracking": MlflowTracking(), "optuna": OptunaStorage()}}
defs = dg.Definitions.merge(
    build_pipeline_defs(load_spec({spec!r})), dg.Definitions(resources=resources, executor=dg.in_process_executor)
)
"""
TRAIN = ["adapter", "data_readiness", "dataset_splits", "eval_report", "registered_model", "token_stats"]
INGEST = ["cleaned_dataset", "raw_dataset"]


def defs_of(text: str, path: Path) -> dg.Definitions:
    return dg.Definitions.merge(
        build_pipeline_defs(parse_spec(text, path=path)), dg.Definitions(resources=default_resources())
    )


def at(minute: int) -> datetime.datetime:
    return datetime.datetime(2026, 12, 4, 10, minute, tzinfo=datetime.UTC)


def test_declarative_mode_swaps_the_run_requests_for_conditions(tmp_path: Path) -> None:
    text = SPEC.format(incoming=tmp_path / "in", model="smollm2-135m-instruct")
    defs = defs_of(text, tmp_path / "decl.yaml")
    graph = defs.resolve_asset_graph()
    labels = {k.path[-1]: graph.get(k).automation_condition.get_label() for k in graph.get_all_asset_keys()}
    assert labels["dataset_splits"] == "new gated data, at most once per '*/10 * * * *'"
    assert labels["raw_dataset"] == labels["base_model"] == "missing (last run not failed) or upstream updated"
    assert {labels[n] for n in TRAIN if n != "dataset_splits"} == {"upstream updated and its blocking checks passed"}
    assert sorted(s.name for s in defs.sensors or []) == [
        "decl_incoming_sensor",
        "decl_ingest_automation",
        "decl_train_automation",
    ]
    assert not defs.schedules
    default = defs_of(text.replace("mode: declarative, ", ""), tmp_path / "d.yaml")
    assert {a.automation_condition for a in default.resolve_asset_graph().asset_nodes} == {None}
    with pytest.raises(
        SpecError, match="automation: mode declarative trains at most once per retrain_cron tick: set retrain_cron"
    ):
        parse_spec(text.replace('retrain_cron: "*/10 * * * *"', "retrain_cron: null"))


def test_daemon_ingests_drops_and_trains_on_gated_data_at_most_once_per_cron(tmp_path: Path, tiny_model: Path) -> None:
    spec = tmp_path / "decl.yaml"
    spec.write_text(SPEC.format(incoming=tmp_path / "incoming", model=tiny_model))
    location = tmp_path / "location.py"
    location.write_text(LOCATION.format(state=str(tmp_path / "state"), spec=str(spec)))
    (tmp_path / "dagster").mkdir()
    overrides = {  # runs are queued; the test launches the ingest ones in process, as the run queue would
        "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"},
        "run_launcher": {
            "module": "dagster._core.launcher.sync_in_memory_run_launcher",
            "class": "SyncInMemoryRunLauncher",
        },
    }
    target = PythonFileTarget(
        python_file=str(location), attribute="defs", working_directory=str(tmp_path), location_name="decl"
    )
    with (
        dg.instance_for_test(overrides=overrides, temp_dir=str(tmp_path / "dagster")) as instance,
        create_test_daemon_workspace_context(target, instance) as workspace,
    ):
        daemon = AssetDaemon(settings=instance.get_auto_materialize_settings(), pre_sensor_interval_seconds=0)
        seen: set[str] = set()

        def tick(minute: int) -> list[tuple[list[str], str | None]]:
            """One AssetDaemon iteration at 10:MM; returns the new runs (assets, partition); launches ingest runs."""
            with freeze_time(at(minute)):
                daemon._run_iteration_impl(
                    workspace, threadpool_executor=None, amp_tick_futures={}, debug_crash_flags={}
                )
            new = [r for r in instance.get_runs() if r.run_id not in seen]
            seen.update(r.run_id for r in new)
            out = []
            for run in new:
                names = sorted(k.path[-1] for k in run.asset_selection or [])
                if names == TRAIN:  # training is not executed here (tier 3 trains); it stays queued, then canceled
                    assert {c.name for c in run.asset_check_selection or []} >= {"no_test_leak", "no_split_overlap"}
                    instance.report_run_canceled(run)
                else:
                    instance.launch_run(run.run_id, workspace.create_request_context())
                out.append((names, run.tags.get("dagster/partition")))
            return out

        def drop(name: str, rows: list) -> str:
            """What the incoming sensor does in this mode: register the file as a partition, request nothing."""
            key = drop_key(write_jsonl(tmp_path / "incoming" / name, rows))
            instance.add_dynamic_partitions("decl_drops", [key])
            return key

        a = drop("a.jsonl", [chat_row(i) for i in range(30)])
        # a drop registered before the first tick is ingested (with its checks) and the base model provisioned
        assert sorted(tick(1)) == [(["base_model"], None), (INGEST, a)]
        cleaned = dg.AssetKey(["decl", "cleaned_dataset"])
        assert instance.get_materialized_partitions(cleaned) == {a}
        assert instance.get_latest_materialization_event(dg.AssetKey(["decl", "base_model"])) is not None
        assert tick(2) == []  # new gated data, but no cron tick since: wait
        assert tick(11) == [(TRAIN, None)]  # 10:10 passed: the whole training chain, one run
        assert tick(12) == []  # handled: not again for this cron tick
        bad = drop("b.jsonl", [chat_row(100 + i) for i in range(5)] + ["{broken"] * 10)
        assert tick(13) == [(INGEST, bad)]  # ingested; its blocking rejection_rate check fails (run fails)
        assert instance.get_runs(limit=1)[0].status == dg.DagsterRunStatus.FAILURE
        assert tick(21) == []  # a cron tick passed, but the only new drop failed its gates: no training
        assert tick(22) == []  # and a failed ingest is not retried in a loop
        c = drop("c.jsonl", [chat_row(200 + i) for i in range(30)])
        assert tick(23) == [(INGEST, c)]
        assert tick(24) == [(TRAIN, None)]  # good data, and the 10:20 tick not yet used
        d = drop("d.jsonl", [chat_row(300 + i) for i in range(30)])
        assert tick(25) == [(INGEST, d)]
        assert tick(26) == []  # at most once per cron tick: waits for 10:30
        assert tick(31) == [(TRAIN, None)]


def test_training_waits_until_every_upstream_blocking_check_passed(tmp_path: Path) -> None:
    """evaluate_automation_conditions on the same definitions: after dataset_splits updated, token_stats and the
    readiness gate follow only once all its blocking checks (no_split_overlap, no_test_leak, ...) passed."""
    text = SPEC.format(incoming=tmp_path / "in", model="smollm2-135m-instruct")
    defs = defs_of(text, tmp_path / "decl.yaml")
    splits, base = dg.AssetKey(["decl", "dataset_splits"]), dg.AssetKey(["decl", "base_model"])

    def requested(result: dg.EvaluateAutomationConditionsResult) -> set[str]:
        return {r.key.path[-1] for r in result.results if isinstance(r.key, dg.AssetKey) and r.true_subset.size}

    blocking = [s.name for s in defs.resolve_assets_def(splits).check_specs if s.blocking]
    assert {"no_split_overlap", "no_test_leak"} <= set(blocking)

    def report(passed: bool) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(splits))
        for name in blocking:
            instance.report_runless_asset_event(
                dg.AssetCheckEvaluation(asset_key=splits, check_name=name, passed=passed or name != "no_test_leak")
            )

    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(dg.AssetMaterialization(base))
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert requested(first) == set()
        report(passed=False)
        failed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        assert "token_stats" not in requested(failed)
        report(passed=True)
        passed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=failed.cursor)
        assert {"token_stats", "data_readiness"} <= requested(passed)
