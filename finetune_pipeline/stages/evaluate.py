"""eval_report: base vs tuned on the test split (reused while the adapter, test rows and settings are unchanged)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from finetune_pipeline import keys
from finetune_pipeline.evaluation.report import EvalRecord
from finetune_pipeline.layout import AdapterRecord, PipelineLayout
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.datasets import log_splits
from finetune_pipeline.tracking import mlflow_store
from finetune_pipeline.tracking.mlflow_store import Lineage, TrackingTarget

LogFn = Callable[[str], None]


@dataclass
class EvalOutcome:
    record: EvalRecord
    reused: bool
    experiment: str
    markdown: str

    def passes_gate(self, spec: LoadedSpec) -> bool:
        return self.record.report.passes_gate(spec.spec.registry.min_improvement_over_base)


def evaluate_adapter(
    layout: PipelineLayout,
    spec: LoadedSpec,
    adapter_key: str,
    tracking: TrackingTarget,
    lineage: Lineage,
    log: LogFn = print,
) -> EvalOutcome:
    """Generate with base and tuned model on up to evaluation.max_samples test rows and score both. The base
    model's outputs are cached by (base weights, test rows, settings), so retraining does not regenerate them."""
    from finetune_pipeline.evaluation.evaluate import evaluate
    from finetune_pipeline.evaluation.report import render_markdown

    s = spec.spec
    manifest, base = layout.read_manifest(), layout.read_base()
    if not layout.adapter_record(adapter_key).exists():
        raise FileNotFoundError(f"adapter {adapter_key} not found: materialize {spec.name}/adapter first")
    adapter = AdapterRecord.load(layout.adapter_record(adapter_key))
    key = keys.eval_key(adapter_key, manifest.digests["test"], s.evaluation)
    exp = mlflow_store.experiment_for(tracking, spec.name)
    if layout.eval_record(key).exists():
        rec = EvalRecord.load(layout.eval_record(key))
        log(f"adapter and test data unchanged: reusing eval {key} (MLflow run {rec.run_id})")
        return EvalOutcome(rec, True, exp, layout.eval_markdown(key).read_text())
    frames = layout.read_split_frames()
    with mlflow_store.run(exp, "eval", lineage, **{"finetune.train_run_id": adapter.train_run_id}) as run:
        log_splits(layout, spec, frames, manifest.digests, ["test"])
        report = evaluate(
            base.path,
            s.model,
            adapter.path,
            list(frames["test"]["messages"]),
            s.evaluation,
            base_cache=layout.base_outputs(keys.base_outputs_key(base, manifest.digests["test"], s)),
            log=log,
        )
        mlflow_store.log_metrics({f"base.{m}": v for m, v in report.base.items()})
        mlflow_store.log_metrics({f"tuned.{m}": v for m, v in report.tuned.items()})
        md = render_markdown(report, f"{spec.name}: base vs tuned")
        rec = EvalRecord(
            eval_key=key,
            adapter_key=adapter_key,
            run_id=run.info.run_id,
            test_digest=manifest.digests["test"],
            report=report,
        )
        layout.eval_markdown(key).parent.mkdir(parents=True, exist_ok=True)
        layout.eval_markdown(key).write_text(md)
        rec.save(layout.eval_record(key))
        mlflow_store.log_artifact(layout.eval_markdown(key))
        mlflow_store.log_artifact(layout.eval_record(key))
    return EvalOutcome(rec, False, exp, md)
