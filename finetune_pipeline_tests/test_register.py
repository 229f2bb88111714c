"""Promotion rules (tier 1) and the register stage against a real MLflow store in a temporary folder (tier 2)."""

import json
from pathlib import Path

import pytest

from finetune_pipeline.evaluation.report import EvalRecord, EvalReport
from finetune_pipeline.layout import AdapterRecord, BaseModelRecord, PipelineLayout
from finetune_pipeline.spec import RuntimeSpec, TrainingSpec, parse_spec
from finetune_pipeline.tracking.mlflow_store import Lineage, TrackingTarget
from finetune_pipeline.tracking.tracker import Tracker
from finetune_pipeline_tests.conftest import chat_row

pytestmark = pytest.mark.integration

SPEC = """
name: reg
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
evaluation: {{primary_metric: perplexity}}
registry: {{model_name: reg-model, min_improvement_over_base: {gate}}}
"""


def _world(tmp_path: Path, tiny_model: Path, gate: float = 0.0):  # type: ignore[no-untyped-def]
    """A spec, a state root with a base-model record as base_model leaves it, rows, and the pipeline's Tracker."""
    spec = parse_spec(SPEC.format(model=tiny_model, gate=gate), path=tmp_path / "reg.yaml")
    layout = PipelineLayout(tmp_path / "state", "reg")
    BaseModelRecord(
        path=str(tiny_model), kind="local", digest="b", source=str(tiny_model), tokenizer_dir=str(tiny_model)
    ).save(layout.base_model)
    rows = [json.dumps(chat_row(i)["messages"]) for i in range(12)]
    tracker = Tracker(TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")), "reg")
    return spec, layout, rows, tracker


def _adapter(layout: PipelineLayout, spec, rows, key: str) -> AdapterRecord:  # type: ignore[no-untyped-def]
    """A really trained (2-step) adapter and its record, as the adapter asset leaves them."""
    from finetune_pipeline.training.sft import TrainRequest, train

    out = layout.adapter(key)
    train(
        TrainRequest(
            base_path=spec.model.base,
            model=spec.model,
            training=TrainingSpec(max_steps=2, per_device_train_batch_size=4, learning_rate=5e-3, max_length=96),
            runtime=RuntimeSpec(logging_steps=1, save_steps=0, calibration_steps=0, eos_check_samples=0),
            train_messages=rows,
            eval_messages=[],
            output_dir=out,
        ),
        log=lambda m: None,
    )
    rec = AdapterRecord(
        adapter_key=key,
        path=str(out),
        train_run_id="",
        spec_hash=spec.spec_hash,
        code_version="c",
        base_weights_digest="b",
        splits_version="v",
        split_digests={"train": "t"},
        drops=["d"],
        params={},
    )
    rec.save(layout.adapter_record(key))
    return rec


def _eval(layout: PipelineLayout, key: str, adapter_key: str, base_ppl: float, tuned_ppl: float) -> str:
    report = EvalReport(
        n_samples=4,
        primary_metric="perplexity",
        base={"perplexity": base_ppl},
        tuned={"perplexity": tuned_ppl},
        samples=[],
    )
    EvalRecord(eval_key=key, adapter_key=adapter_key, run_id="", test_digest="t", report=report).save(
        layout.eval_record(key)
    )
    return key


def test_register_round_trips_and_is_idempotent(tiny_model: Path, tmp_path: Path) -> None:
    """(Promotion against a champion on the same rows: test_promotion.py.)"""
    from finetune_pipeline.stages.register import register

    spec, layout, rows, tracker = _world(tmp_path, tiny_model)
    lin = Lineage("reg", "reg/registered_model", "run-1", None, "c", spec.spec_hash)
    _adapter(layout, spec, rows, "k1")
    first = register(layout, spec, _eval(layout, "e1", "k1", 20.0, 10.0), tracker, lin, log=lambda m: None)
    assert first.promoted and first.aliases == ["challenger", "champion"] and first.reason == "no champion yet"
    assert first.reload_max_logit_diff < 1e-4  # the registry copy gives the trained logits
    again = register(layout, spec, "e1", tracker, lin, log=lambda m: None)
    assert again.version == first.version  # the same adapter is not registered twice


def test_failed_gate_registers_nothing(tiny_model: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from finetune_pipeline.stages.register import GateFailed, register

    spec, layout, rows, tracker = _world(tmp_path, tiny_model, gate=5.0)
    lin = Lineage("reg", "reg/registered_model", "run-1", None, "c", spec.spec_hash)
    _adapter(layout, spec, rows, "k1")
    with pytest.raises(GateFailed, match="tuned - base 1.0000; the lower bound must be >= 5.0"):
        register(layout, spec, _eval(layout, "e1", "k1", 11.0, 10.0), tracker, lin, log=lambda m: None)
    uri = tracker.target.tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.search_model_versions("name = 'reg-model'") == []


def test_only_a_missing_alias_means_no_champion(tmp_path: Path) -> None:
    """A registry that cannot be read must fail the step, never read as "no champion" (which would move it)."""
    tracker = Tracker(TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "art")), "p")
    assert tracker.experiment_id and tracker.champion("no-such-model") is None
    (tmp_path / "mlflow.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(Exception) as exc:
        Tracker(tracker.target, "p").champion("no-such-model")
    assert "RESOURCE_DOES_NOT_EXIST" not in str(exc.value)


def test_records_come_back_typed(tmp_path: Path) -> None:
    """Records come back typed, NaN (no value) included."""
    report = EvalReport(
        n_samples=1,
        primary_metric="exact_match",
        base={"exact_match": float("nan")},
        tuned={"exact_match": 1.0},
        samples=[],
    )
    rec = EvalRecord(eval_key="e", adapter_key="a", run_id="r", test_digest="t", report=report)
    back = EvalRecord.load(rec.save(tmp_path / "e.json"))
    assert isinstance(back.report, EvalReport) and back.report.tuned == {"exact_match": 1.0}
    assert back.report.base["exact_match"] != back.report.base["exact_match"]  # NaN
