"""Over the splits: data_readiness, whether the data is ready to fine-tune on (before any training is paid for)."""

from __future__ import annotations

import json

import pandas as pd

from finetune_pipeline.data.readiness import Readiness, assess
from finetune_pipeline.layout import AdapterRecord, PipelineLayout
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.training.configs import effective_batch, planned_steps


def gate_confidence(spec: LoadedSpec) -> float | None:
    """The evaluation gate's confidence when the spec has such a setting (evaluation or registry), else None."""
    for section in (spec.evaluation, spec.registry):
        value = getattr(section, "confidence", None)
        if isinstance(value, int | float):
            return float(value)
    return None


def last_tokens_per_second(layout: PipelineLayout) -> float | None:
    """Throughput the last trained adapter measured (its calibration), if any adapter was trained here."""
    records = (
        sorted(layout.adapters.glob("*/adapter.json"), key=lambda p: p.stat().st_mtime)
        if layout.adapters.exists()
        else []
    )
    for path in reversed(records):
        tps = AdapterRecord.load(path).cost.get("tokens_per_second")
        if tps:
            return float(tps)
    return None


def data_readiness(layout: PipelineLayout, spec: LoadedSpec) -> Readiness:
    """Rows per split, the test split's resolving power for the gate, label balance, token budget, verdict."""
    s = spec.spec
    counts = layout.read_manifest().counts
    train = pd.read_parquet(layout.split("train"), columns=["label"]) if layout.split("train").exists() else None
    labels = (
        {str(k): int(v) for k, v in train["label"].value_counts().items()}
        if train is not None and "label" in train and train["label"].notna().any()
        else {}
    )
    mean_tokens = None
    if layout.token_stats.exists():
        mean_tokens = json.loads(layout.token_stats.read_text()).get("train", {}).get("mean")
    t = s.training
    rec = assess(
        counts,
        max_eval_samples=s.evaluation.max_samples,
        gate_margin=s.registry.min_improvement_over_base,
        confidence=gate_confidence(spec),
        label_counts=labels,
        mean_train_tokens=mean_tokens,
        tokens_per_step_rows=effective_batch(t),
        max_steps=planned_steps(t, counts.get("train", 0)),  # from max_steps or num_train_epochs
        tokens_per_second=last_tokens_per_second(layout),
        budget_minutes=t.max_minutes,
        min_train_rows=s.split.min_train_rows,
        min_test_rows=s.split.min_test_rows,
    )
    layout.readiness.write_text(json.dumps(rec.as_dict(), indent=2))
    return rec
