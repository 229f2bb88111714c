"""Tier 2: the drop sensor and the retraining schedule against a real (temporary, SQLite) Dagster instance."""

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from finetune_pipeline.data.drops import drop_key, scan_incoming
from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.spec import parse_spec
from finetune_pipeline_tests.conftest import chat_row, write_jsonl

pytestmark = pytest.mark.integration


def _spec(tmp_path: Path, settle: float = 0.0):
    text = f"""
name: watch
source: {{incoming_dir: {tmp_path / "incoming"}, settle_seconds: {settle}}}
registry: {{model_name: watch-model}}
automation: {{retrain_cron: "0 3 * * *"}}
"""
    return parse_spec(text, path=tmp_path / "watch.yaml")


def _defs(spec, tmp_path: Path) -> dg.Definitions:
    from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore

    res = {
        "state": StateStore(root=str(tmp_path / "state")),
        "mlflow_tracking": MlflowTracking(),
        "optuna": OptunaStorage(),
    }
    return dg.Definitions.merge(build_pipeline_defs(spec), dg.Definitions(resources=res))


def _instance(tmp_path: Path):
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return dg.instance_for_test(temp_dir=str(tmp_path / "dagster"))


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_scan_waits_for_a_file_to_settle(tmp_path: Path) -> None:
    inc = tmp_path / "in"
    f = write_jsonl(inc / "a.jsonl", [chat_row(1)])
    first = scan_incoming(inc, "*.jsonl", 0, {}, set())  # first sighting: size/mtime unknown before
    assert first.ready == [] and first.waiting == [str(f)]
    with f.open("a") as fh:  # the writer appends between ticks: still not ready
        fh.write(json.dumps(chat_row(2)) + "\n")
    second = scan_incoming(inc, "*.jsonl", 0, first.seen, set())
    assert second.ready == []
    # too young for the settle time: waits even when unchanged
    assert scan_incoming(inc, "*.jsonl", 3600, second.seen, set()).ready == []
    third = scan_incoming(inc, "*.jsonl", 0, second.seen, set())
    assert [d.key for d in third.ready] == [drop_key(f)] and third.seen[str(f)][3] == drop_key(f)
    fourth = scan_incoming(inc, "*.jsonl", 0, third.seen, {drop_key(f)})
    assert fourth.ready == [] and fourth.unchanged_skipped == 1


def test_same_content_twice_is_one_drop_and_temp_files_are_ignored(tmp_path: Path) -> None:
    inc = tmp_path / "in"
    a = write_jsonl(inc / "a.jsonl", [chat_row(1)])
    (inc / "copy.jsonl").write_bytes(a.read_bytes())
    write_jsonl(inc / ".hidden.jsonl", [chat_row(3)])
    (inc / "upload.jsonl.part").write_text("{")
    res = scan_incoming(inc, "*.jsonl", 0, None, set())
    assert len(res.ready) == 1 and res.unchanged_skipped == 1
    again = scan_incoming(inc, "*.jsonl", 0, None, {res.ready[0].key})
    assert again.ready == [] and again.unchanged_skipped == 2


def test_sensor_registers_partitions_once(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    defs = _defs(spec, tmp_path)
    sensor = defs.resolve_sensor_def("watch_incoming_sensor")
    f = write_jsonl(tmp_path / "incoming" / "a.jsonl", [chat_row(1), chat_row(2)])
    _age(f, 10)
    with _instance(tmp_path) as instance:
        ctx = dg.build_sensor_context(instance=instance, definitions=defs)
        r1 = sensor(ctx)
        assert not r1.run_requests and r1.cursor  # first sighting only records size/mtime
        ctx = dg.build_sensor_context(instance=instance, cursor=r1.cursor, definitions=defs)
        r2 = sensor(ctx)
        assert [r.partition_key for r in r2.run_requests] == [drop_key(f)]
        assert r2.dynamic_partitions_requests[0].partition_keys == [drop_key(f)]
        assert r2.run_requests[0].tags["finetune/source_file"] == str(f)
        instance.add_dynamic_partitions("watch_drops", [drop_key(f)])  # what the daemon does with the request
        ctx = dg.build_sensor_context(instance=instance, cursor=r2.cursor, definitions=defs)
        r3 = sensor(ctx)
        assert not r3.run_requests and "1 already ingested" in str(r3.skip_reason)


def test_sensor_requests_at_most_max_runs_per_tick_oldest_first(tmp_path: Path) -> None:
    """Eight finished files, ``max_runs_per_tick: 3``: the ticks request 3, 3, 2 (oldest file first), each file once,
    and the files not yet requested are not yet partitions."""
    text = f"""
name: watch
source: {{incoming_dir: {tmp_path / "incoming"}, settle_seconds: 0}}
registry: {{model_name: watch-model}}
automation: {{retrain_cron: null, max_runs_per_tick: 3}}
"""
    spec = parse_spec(text, path=tmp_path / "watch.yaml")
    defs = _defs(spec, tmp_path)
    sensor = defs.resolve_sensor_def("watch_incoming_sensor")
    files = []
    for i in range(8):  # written newest first: the order of requests follows the files' age, not their names
        f = write_jsonl(tmp_path / "incoming" / f"{i}.jsonl", [chat_row(i)])
        _age(f, 100 + i)
        files.append(f)
    oldest_first = [drop_key(f) for f in reversed(files)]
    requested: list[list[str]] = []
    with _instance(tmp_path) as instance:
        cursor = sensor(dg.build_sensor_context(instance=instance, definitions=defs)).cursor  # first sighting
        for _ in range(4):
            res = sensor(dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs))
            cursor = res.cursor
            requested.append([r.partition_key for r in res.run_requests])
            for req in res.dynamic_partitions_requests or []:  # what the daemon does with the request
                instance.add_dynamic_partitions("watch_drops", list(req.partition_keys))
            assert set(instance.get_dynamic_partitions("watch_drops")) == {k for r in requested for k in r}
    assert requested == [oldest_first[:3], oldest_first[3:6], oldest_first[6:], []]


def test_ingest_job_and_schedule_skip_until_data_changes(tmp_path: Path) -> None:
    """raw_dataset + cleaned_dataset for a partition with real resources; the schedule asks to retrain only
    while the set of cleaned drops differs from what the last adapter recorded."""
    from finetune_pipeline.defs.automation import current_fingerprint
    from finetune_pipeline.defs.resources import StateStore

    spec = _spec(tmp_path)
    defs = _defs(spec, tmp_path)
    f = write_jsonl(tmp_path / "incoming" / "a.jsonl", [chat_row(i) for i in range(20)] + ["{broken"])
    key = drop_key(f)
    schedule = defs.resolve_schedule_def("watch_retrain_schedule")
    with _instance(tmp_path) as instance:
        assert (
            "no usable drops"
            in schedule.evaluate_tick(
                dg.build_schedule_context(
                    instance=instance, resources={"state": StateStore(root=str(tmp_path / "state"))}
                )
            ).skip_message
        )
        instance.add_dynamic_partitions("watch_drops", [key])
        assets = [a for a in defs.assets if a.key.path[-1] in ("raw_dataset", "cleaned_dataset")]
        res = dg.materialize(
            assets, partition_key=key, instance=instance, resources={"state": StateStore(root=str(tmp_path / "state"))}
        )
        assert res.success
        mats = {m.asset_key.path[-1]: m for m in res.get_asset_materialization_events()}
        md = mats["cleaned_dataset"].materialization.metadata
        assert (md["rows_in"].value, md["kept"].value, md["quarantined"].value) == (21, 20, 1)
        assert md["rejection_reasons"].value == {"invalid_json": 1}
        checks = {c.check_name: c.passed for c in res.get_asset_check_evaluations()}
        assert checks == {"rows_accounted": True, "rejection_rate": True, "chat_schema": True, "drift": True}
        tick = schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, resources={"state": StateStore(root=str(tmp_path / "state"))})
        )
        assert len(tick.run_requests) == 1
        fp, drops = current_fingerprint(instance, StateStore(root=str(tmp_path / "state")), spec)
        assert drops == [key]
        # Record an adapter trained on exactly this data: the schedule now skips.
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=dg.AssetKey(["watch", "adapter"]), metadata={"training_fingerprint": fp})
        )
        tick = schedule.evaluate_tick(
            dg.build_schedule_context(instance=instance, resources={"state": StateStore(root=str(tmp_path / "state"))})
        )
        assert tick.run_requests == [] and "unchanged" in tick.skip_message


def test_rejection_gate_blocks_a_bad_drop(tmp_path: Path) -> None:
    from finetune_pipeline.defs.resources import StateStore

    spec = _spec(tmp_path)
    defs = _defs(spec, tmp_path)
    f = write_jsonl(tmp_path / "incoming" / "bad.jsonl", [chat_row(1)] + ["{nope"] * 3)
    with _instance(tmp_path) as instance:
        instance.add_dynamic_partitions("watch_drops", [drop_key(f)])
        assets = [a for a in defs.assets if a.key.path[-1] in ("raw_dataset", "cleaned_dataset")]
        res = dg.materialize(
            assets,
            partition_key=drop_key(f),
            instance=instance,
            raise_on_error=False,
            resources={"state": StateStore(root=str(tmp_path / "state"))},
        )
        checks = {c.check_name: c for c in res.get_asset_check_evaluations()}
        assert checks["rejection_rate"].passed is False
        assert checks["rejection_rate"].metadata["rejection_rate"].value == pytest.approx(0.75)
        assert not res.success  # blocking check fails the run
        # and the drop is kept out of training: no published cleaned rows, not among the usable drops
        layout = StateStore(root=str(tmp_path / "state")).pipeline(spec.name)
        assert not layout.kept(drop_key(f)).exists()
        assert layout.usable_drops([drop_key(f)]) == []
        assert layout.quarantine(drop_key(f)).exists()


def _words_row(i: int, vocab: list[str], n: int) -> dict:
    import random

    r = random.Random(i)
    q = " ".join(r.choice(vocab) for _ in range(n))
    return {
        "id": f"w{i}",
        "messages": [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": "Noted."}],
    }


def test_drift_check_warns_and_the_schedule_retrains_only_on_drift(tmp_path: Path) -> None:
    """A drop like the training data passes the drift check and (with drift.retrain_threshold) does not trigger
    retraining; a drop of other words and lengths warns (without failing the run) and does."""
    from finetune_pipeline.defs.automation import current_fingerprint
    from finetune_pipeline.defs.resources import StateStore

    text = f"""
name: watch
source: {{incoming_dir: {tmp_path / "incoming"}, settle_seconds: 0}}
registry: {{model_name: watch-model}}
drift: {{warn_threshold: 0.3, retrain_threshold: 0.5}}
"""
    spec = parse_spec(text, path=tmp_path / "watch.yaml")
    defs = _defs(spec, tmp_path)
    state = StateStore(root=str(tmp_path / "state"))
    common = [f"alpha{i}" for i in range(300)]
    other = [f"omega{i}" for i in range(300)]
    a = write_jsonl(tmp_path / "incoming" / "a.jsonl", [_words_row(i, common, 12) for i in range(200)])
    b = write_jsonl(tmp_path / "incoming" / "b.jsonl", [_words_row(i, common, 12) for i in range(200, 300)])
    c = write_jsonl(tmp_path / "incoming" / "c.jsonl", [_words_row(i, other, 40) for i in range(300, 400)])
    ingest = [x for x in defs.assets if x.key.path[-1] in ("raw_dataset", "cleaned_dataset")]
    splits = [x for x in defs.assets if x.key.path[-1] == "dataset_splits"]
    schedule = defs.resolve_schedule_def("watch_retrain_schedule")

    def tick(instance):  # type: ignore[no-untyped-def]
        return schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources={"state": state}))

    with _instance(tmp_path) as instance:
        for f in (a, b, c):
            instance.add_dynamic_partitions("watch_drops", [drop_key(f)])
        assert dg.materialize(ingest, partition_key=drop_key(a), instance=instance, resources={"state": state}).success
        res = dg.materialize(splits, instance=instance, resources={"state": state}, selection=splits)
        assert res.success
        checks = {x.check_name: x.passed for x in res.get_asset_check_evaluations()}
        assert checks == {
            "no_split_overlap": True,
            "no_test_leak": True,
            "rows_accounted": True,
            "label_conflicts": True,
        }
        fp, _ = current_fingerprint(instance, state, spec)
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=dg.AssetKey(["watch", "adapter"]), metadata={"training_fingerprint": fp})
        )
        res_b = dg.materialize(ingest, partition_key=drop_key(b), instance=instance, resources={"state": state})
        drift_b = next(x for x in res_b.get_asset_check_evaluations() if x.check_name == "drift")
        assert drift_b.passed and drift_b.metadata["score"].value < 0.3
        assert "does not drift enough" in tick(instance).skip_message
        res_c = dg.materialize(ingest, partition_key=drop_key(c), instance=instance, resources={"state": state})
        assert res_c.success  # a warning, not a blocking failure
        drift_c = next(x for x in res_c.get_asset_check_evaluations() if x.check_name == "drift")
        assert not drift_c.passed and drift_c.severity == dg.AssetCheckSeverity.WARN
        assert drift_c.metadata["vocabulary"].value > 0.8
        mat = next(m for m in res_c.get_asset_materialization_events() if m.asset_key.path[-1] == "cleaned_dataset")
        assert mat.materialization.metadata["drift"].value["score"] >= 0.5
        assert len(tick(instance).run_requests) == 1


def test_a_csv_drop_keeps_its_format_through_the_assets(tmp_path: Path) -> None:
    from finetune_pipeline.defs.resources import StateStore

    text = f"""
name: watch
source: {{incoming_dir: {tmp_path / "incoming"}, settle_seconds: 0, file_glob: "*.csv"}}
registry: {{model_name: watch-model}}
"""
    spec = parse_spec(text, path=tmp_path / "watch.yaml")
    defs = _defs(spec, tmp_path)
    state = StateStore(root=str(tmp_path / "state"))
    f = tmp_path / "incoming" / "tickets.csv"
    f.parent.mkdir(parents=True)
    f.write_text("instruction,output\n" + "".join(f"Summarise item {i}.,Item {i} is fine.\n" for i in range(30)))
    ingest = [x for x in defs.assets if x.key.path[-1] in ("raw_dataset", "cleaned_dataset")]
    with _instance(tmp_path) as instance:
        instance.add_dynamic_partitions("watch_drops", [drop_key(f)])
        res = dg.materialize(ingest, partition_key=drop_key(f), instance=instance, resources={"state": state})
        assert res.success
        md = next(
            m.materialization.metadata
            for m in res.get_asset_materialization_events()
            if m.asset_key.path[-1] == "cleaned_dataset"
        )
        assert (md["file_format"].value, md["record_format"].value, md["kept"].value) == ("csv", "alpaca", 30)
        layout = state.pipeline(spec.name)
        assert layout.raw(drop_key(f)).suffix == ".csv"
        assert layout.raw(drop_key(f)).read_bytes() == f.read_bytes()
