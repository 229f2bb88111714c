"""Tier 2: a spec that trains by epochs goes through the Dagster assets (data_readiness, hyperparameter_sweep,
adapter) in one dg.materialize on the tiny model; the model card's training line shows the steps actually trained;
data_readiness then warns when training.max_minutes covers less than one epoch at the pace the adapter measured."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from finetune_pipeline_tests.conftest import chat_row, local_resources, prepared_splits

pytestmark = pytest.mark.integration

SPEC = (
    "name: ep\nsource: {{incoming_dir: in}}\nregistry: {{model_name: m}}\n"
    "model: {{base: {model}, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}\n"
    "training: {{num_train_epochs: 2, per_device_train_batch_size: 8, max_length: 96, learning_rate: 0.005{extra}}}\n"
    "runtime: {{logging_steps: 1, save_steps: 0, calibration_steps: 1, eos_check_samples: 0}}\n"
    "sweep: {{enabled: true, n_trials: 1, max_steps: 2, pruner: none, "
    "search_space: {{learning_rate: {{type: categorical, choices: [0.005]}}}}}}\n"
)


def test_an_epochs_spec_trains_through_the_assets(tmp_path: Path, tiny_model: Path) -> None:
    from finetune_pipeline.defs.data_assets import data_readiness_asset
    from finetune_pipeline.defs.training_assets import adapter_asset, sweep_asset
    from finetune_pipeline.layout import AdapterRecord
    from finetune_pipeline.spec import parse_spec
    from finetune_pipeline.stages.register import trained_steps

    spec = parse_spec(SPEC.format(model=tiny_model, extra=""), path=tmp_path / "ep.yaml")
    messages = [json.dumps(chat_row(i)["messages"]) for i in range(40)]
    layout = prepared_splits(tmp_path, "ep", tiny_model, messages, 32, 4)
    layout.token_stats.write_text(json.dumps({"train": {"mean": 40.0}}))
    resources = local_resources(tmp_path)
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        res = dg.materialize(
            [data_readiness_asset(spec), sweep_asset(spec), adapter_asset(spec)],
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert res.success
        ready = instance.get_latest_materialization_event(dg.AssetKey(["ep", "data_readiness"]))
        readiness = ready.asset_materialization.metadata["readiness"].value
        assert readiness["train_tokens"] == 40 * 8 * 8  # 2 epochs of 32 rows at batch 8 = 8 steps
        ev = instance.get_latest_materialization_event(dg.AssetKey(["ep", "adapter"]))
        meta = {k: v.value for k, v in ev.asset_materialization.metadata.items()}
    assert meta["steps"] == meta["planned_steps"] == 8 and meta["epochs_trained"] == pytest.approx(2.0)
    rec = AdapterRecord.load(Path(meta["path"]) / "adapter.json")
    line = trained_steps(spec.training, rec.cost)
    assert line.startswith("steps trained=8 (planned 8 from num_train_epochs=2)") and "epochs trained=2.00" in line

    # the same data with a budget far under one epoch: readiness warns with the minutes one epoch takes here
    tight = parse_spec(SPEC.format(model=tiny_model, extra=", max_minutes: 0.0001"), path=tmp_path / "ep.yaml")
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        res = dg.materialize([data_readiness_asset(tight)], instance=instance, resources=resources)
        check = next(e for e in res.get_asset_check_evaluations() if e.check_name == "budget_covers_an_epoch")
    assert not check.passed and "covers about" in check.description and "minutes here" in check.description
