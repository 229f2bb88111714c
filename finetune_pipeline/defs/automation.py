"""Per-pipeline automation: a sensor on the incoming folder and a retraining schedule that skips unchanged data."""

import json
from typing import Any

import dagster as dg

from finetune_pipeline.data.drift import DriftReport
from finetune_pipeline.defs.common import drops_partitions, key
from finetune_pipeline.defs.data_assets import SOURCE_TAG
from finetune_pipeline.defs.resources import StateStore
from finetune_pipeline.keys import training_fingerprint
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.ingest import scan_sources


def build_sensor(spec: LoadedSpec, ingest_job: Any) -> dg.SensorDefinition:
    parts = drops_partitions(spec)
    auto = spec.automation
    folders = ", ".join(str(spec.incoming_of(s)) for s in spec.source_list())
    declarative = auto.mode == "declarative"
    what = "Registers" if declarative else "Ingests"

    @dg.sensor(
        name=f"{spec.name}_incoming_sensor",
        job=None if declarative else ingest_job,
        minimum_interval_seconds=auto.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING if auto.sensor_enabled else dg.DefaultSensorStatus.STOPPED,
        description=f"{what} each finished file dropped into {folders} as one partition (by content hash).",
    )
    def incoming_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        previous = json.loads(context.cursor).get("seen", {}) if context.cursor else {}
        known = set(context.instance.get_dynamic_partitions(parts.name))
        scan = scan_sources(spec, previous, known)
        cursor = json.dumps({"seen": scan.seen})
        if not scan.ready:
            return dg.SensorResult(
                skip_reason=f"no new finished files in {folders} ({len(scan.waiting)} still being written "
                f"or settling, {scan.unchanged_skipped} already ingested){': ' + scan.waiting_summary() if scan.waiting else ''}",
                cursor=cursor,
            )
        # runs are requested oldest file first, at most runs_per_tick a tick (Dagster submits them inside the tick);
        # the rest stay unregistered and are found ready again on the next tick (their hashes are in the cursor)
        batch = scan.ready if declarative else oldest_first(scan.ready)[: auto.runs_per_tick]
        keys = [d.key for d in batch]
        if declarative:  # the raw/cleaned assets' eager AutomationCondition ingests the new partitions
            context.log.info(f"registered {len(keys)} drop(s) as partitions; declarative automation ingests them")
        elif len(batch) < len(scan.ready):
            context.log.info(
                f"requesting {len(batch)} of {len(scan.ready)} new drops this tick (automation.max_runs_per_tick "
                f"{auto.runs_per_tick}); the other {len(scan.ready) - len(batch)} follow on the next ticks"
            )
        return dg.SensorResult(
            run_requests=[]
            if declarative
            else [
                dg.RunRequest(partition_key=d.key, run_key=f"{spec.name}:{d.key}", tags={SOURCE_TAG: str(d.path)})
                for d in batch
            ],
            dynamic_partitions_requests=[parts.build_add_request(keys)],
            cursor=cursor,
        )

    return incoming_sensor


def oldest_first(drops: list[Any]) -> list[Any]:
    """Drops by their file's modification time, then path (a file that vanished sorts last)."""

    def when(d: Any) -> tuple[float, str]:
        try:
            return d.path.stat().st_mtime, str(d.path)
        except OSError:
            return float("inf"), str(d.path)

    return sorted(drops, key=when)


def current_fingerprint(instance: dg.DagsterInstance, state: StateStore, spec: LoadedSpec) -> tuple[str, list[str]]:
    """Fingerprint of the data the next training run would use (the drops that passed their gates) and the spec.
    dataset_splits records the same drops, and the adapter the same fingerprint."""
    drops = state.pipeline(spec.name).usable_drops(instance.get_dynamic_partitions(drops_partitions(spec).name))
    return training_fingerprint(drops, spec.spec_hash), drops


def last_trained_fingerprint(instance: dg.DagsterInstance, spec: LoadedSpec) -> str | None:
    ev = instance.get_latest_materialization_event(key(spec, "adapter"))
    mat = ev.asset_materialization if ev is not None else None
    if mat is None:
        return None
    v = mat.metadata.get("training_fingerprint")
    return str(v.value) if v is not None else None


def last_split_drops(instance: dg.DagsterInstance, spec: LoadedSpec) -> list[str]:
    ev = instance.get_latest_materialization_event(key(spec, "dataset_splits"))
    mat = ev.asset_materialization if ev is not None else None
    v = mat.metadata.get("drops") if mat is not None else None
    return list(v.value) if v is not None else []  # type: ignore[arg-type]


def drift_of_new_drops(
    instance: dg.DagsterInstance, state: StateStore, spec: LoadedSpec, drops: list[str]
) -> dict[str, float]:
    """Drift score of each usable drop not yet in the splits (1.0 when it arrived before any training split)."""
    seen = set(last_split_drops(instance, spec))
    layout = state.pipeline(spec.name)
    return {
        d: DriftReport.load(layout.drift(d)).score if layout.drift(d).exists() else 1.0 for d in drops if d not in seen
    }


def build_schedule(spec: LoadedSpec, train_job: Any) -> dg.ScheduleDefinition | None:
    auto = spec.automation
    if not auto.retrain_cron or auto.mode == "declarative":
        return None

    @dg.schedule(
        name=f"{spec.name}_retrain_schedule",
        cron_schedule=auto.retrain_cron,
        job=train_job,
        default_status=dg.DefaultScheduleStatus.RUNNING if auto.schedule_enabled else dg.DefaultScheduleStatus.STOPPED,
        description="Retrains when the cleaned drops or the spec changed since the last adapter (and, with "
        "drift.retrain_threshold, only when a new drop drifts that far); skips otherwise.",
    )
    def retrain_schedule(context: dg.ScheduleEvaluationContext, state: StateStore) -> dg.RunRequest | dg.SkipReason:
        fp, drops = current_fingerprint(context.instance, state, spec)
        if not drops:
            return dg.SkipReason(
                "no usable drops yet: drop a data file into the incoming folder (and let it pass its gates)"
            )
        last = last_trained_fingerprint(context.instance, spec)
        if last == fp:
            return dg.SkipReason(
                f"training data unchanged since the last adapter (fingerprint {fp}, {len(drops)} drops)"
            )
        threshold = spec.drift.retrain_threshold
        if threshold is not None and last is not None:
            scores = drift_of_new_drops(context.instance, state, spec, drops)
            top = max(scores.values(), default=0.0)
            if top < threshold:
                return dg.SkipReason(
                    f"new data does not drift enough to retrain: highest drift score {top:.3f} < "
                    f"drift.retrain_threshold {threshold} ({len(scores)} new drop(s))"
                )
        return dg.RunRequest(run_key=f"{spec.name}:retrain:{fp}", tags={"finetune/training_fingerprint": fp})

    return retrain_schedule
