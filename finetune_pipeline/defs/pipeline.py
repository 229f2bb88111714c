"""build_pipeline_defs(spec): one spec -> one prefixed asset group with its jobs, sensor and schedule (or, with
``automation.mode: declarative``, AutomationConditions on the assets; see declarative.py)."""

from __future__ import annotations

import dagster as dg

from finetune_pipeline.defs.automation import build_schedule, build_sensor
from finetune_pipeline.defs.common import drops_partitions, key
from finetune_pipeline.defs.data_assets import build_data_assets
from finetune_pipeline.defs.declarative import automation_sensors, with_conditions
from finetune_pipeline.defs.release_assets import build_release_assets
from finetune_pipeline.defs.training_assets import build_training_assets
from finetune_pipeline.spec import LoadedSpec


def build_pipeline_defs(spec: LoadedSpec) -> dg.Definitions:
    """All definitions for one pipeline spec (resources are supplied once, by the caller)."""
    data_assets = build_data_assets(spec)
    model_assets = [*build_training_assets(spec), *build_release_assets(spec)]
    declarative = spec.automation.mode == "declarative"
    if declarative:  # AutomationConditions (and their sensors) instead of ingest run requests and a schedule
        data_assets, model_assets = with_conditions(spec, data_assets), with_conditions(spec, model_assets)
    ingest = dg.define_asset_job(
        f"{spec.name}_ingest",
        selection=dg.AssetSelection.assets(key(spec, "raw_dataset"), key(spec, "cleaned_dataset")),
        partitions_def=drops_partitions(spec),
        description="Ingest one dropped file: raw_dataset and cleaned_dataset for its partition.",
    )
    train = dg.define_asset_job(
        f"{spec.name}_train",
        selection=dg.AssetSelection.assets(
            key(spec, "dataset_splits"),
            key(spec, "token_stats"),
            key(spec, "data_readiness"),
            *[a.key for a in model_assets],
        ),
        description="Splits, token statistics, base model, sweep, adapter, evaluation and registration.",
    )
    schedule = build_schedule(spec, train)
    return dg.Definitions(
        assets=[*data_assets, *model_assets],
        jobs=[ingest, train],
        sensors=[build_sensor(spec, ingest), *(automation_sensors(spec) if declarative else [])],
        schedules=[schedule] if schedule else [],
    )
