"""Declarative automation (``automation.mode: declarative``): AutomationConditions on the assets instead of the
ingest run requests and the retraining schedule. Two automation sensors per pipeline evaluate them (Dagster's
daemon ticks them): ``NAME_ingest_automation`` (raw_dataset, cleaned_dataset, base_model; on by default when
``automation.sensor_enabled``) and ``NAME_train_automation`` (the rest; on by default when
``automation.schedule_enabled``), the same switches as the sensor and the schedule of the other mode.

- raw_dataset / cleaned_dataset / base_model: when missing (every registered drop, also those registered before
  the condition first ran) or when the upstream updated; not while a run is in progress, and not again after a
  failed run of that partition (no retry loop: fix the cause and materialise it by hand).
- dataset_splits, the root of training: when a drop whose blocking checks passed was updated since the last
  request, no drop is being ingested, and a ``retrain_cron`` tick passed since the last request: at most once per tick.
- everything after it (token_stats ... registered_model): when an upstream asset updated (or is requested in the
  same tick) and every blocking check of every upstream asset passed (or runs in that same run, where a failure
  stops the run before the child). A failed gate therefore stops the chain until new data arrives.
"""

from __future__ import annotations

import dagster as dg

from finetune_pipeline.spec import LoadedSpec

AC = dg.AutomationCondition
INGEST = ("raw_dataset", "cleaned_dataset")
BASE = "base_model"
TRAIN_ROOT = "dataset_splits"


def good_drop_updated() -> dg.AutomationCondition:
    """Some upstream partition was newly updated with every blocking check passed (a drop that passed its gates)."""
    return AC.any_deps_match(
        AC.newly_updated() & AC.all_checks_match(AC.check_passed(), blocking_only=True)
    ).with_label("a drop that passed its blocking checks was updated")


def train_root_condition(cron: str) -> dg.AutomationCondition:
    """dataset_splits: new good data since the last request, at most once per cron tick."""
    return (
        good_drop_updated().since_last_handled()
        & AC.cron_tick_passed(cron).since_last_handled()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label(f"new gated data, at most once per '{cron}'")


def downstream_condition() -> dg.AutomationCondition:
    """After dataset_splits: an upstream asset updated and all upstream blocking checks passed."""
    return (
        AC.any_deps_updated().since_last_handled()
        & AC.all_deps_blocking_checks_passed()
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("upstream updated and its blocking checks passed")


def ingest_condition() -> dg.AutomationCondition:
    return (
        ((AC.missing() & ~AC.execution_failed()) | AC.any_deps_updated().since_last_handled())
        & ~AC.any_deps_missing()
        & ~AC.any_deps_in_progress()
        & ~AC.in_progress()
    ).with_label("missing (last run not failed) or upstream updated")


def condition_for(spec: LoadedSpec, asset_name: str) -> dg.AutomationCondition:
    cron = spec.automation.retrain_cron
    assert cron, "automation.mode declarative needs automation.retrain_cron (the spec validation says so)"
    if asset_name in (*INGEST, BASE):
        return ingest_condition()
    if asset_name == TRAIN_ROOT:
        return train_root_condition(cron)
    return downstream_condition()


def automation_sensors(spec: LoadedSpec) -> list[dg.AutomationConditionSensorDefinition]:
    auto = spec.automation
    ingest_keys = [dg.AssetKey([spec.name, n]) for n in (*INGEST, BASE)]
    ingest = dg.AssetSelection.assets(*ingest_keys)
    running = {True: dg.DefaultSensorStatus.RUNNING, False: dg.DefaultSensorStatus.STOPPED}
    return [
        dg.AutomationConditionSensorDefinition(
            f"{spec.name}_ingest_automation",
            target=ingest,
            default_status=running[auto.sensor_enabled],
            minimum_interval_seconds=auto.sensor_interval_seconds,
            description="Declarative automation of ingestion: each registered drop is ingested eagerly.",
        ),
        dg.AutomationConditionSensorDefinition(
            f"{spec.name}_train_automation",
            target=dg.AssetSelection.groups(spec.name) - ingest,
            default_status=running[auto.schedule_enabled],
            minimum_interval_seconds=auto.sensor_interval_seconds,
            description=f"Declarative automation of training: when a drop passed its gates, at most once per "
            f"'{auto.retrain_cron}', every upstream blocking check passed.",
        ),
    ]


def with_conditions(spec: LoadedSpec, assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """The pipeline's assets, each with its AutomationCondition (keys are ``<pipeline>/<asset name>``)."""
    return [
        a.map_asset_specs(lambda s: s.replace_attributes(automation_condition=condition_for(spec, s.key.path[-1])))
        for a in assets
    ]
