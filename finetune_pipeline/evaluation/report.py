"""Evaluation report: base vs tuned on the test split, metric table and sample outputs side by side."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune_pipeline.evaluation.metrics import METRICS, improvement, score
from finetune_pipeline.layout import Record
from finetune_pipeline.spec import EvaluationSpec


class EvalReport(BaseModel):
    """Base vs tuned on the same test rows: the metric table and sample outputs."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    n_samples: int
    primary_metric: str
    base: dict[str, float]
    tuned: dict[str, float]
    samples: list[dict[str, Any]]

    @property
    def delta(self) -> dict[str, float]:
        return {m: improvement(m, self.tuned[m], self.base[m]) for m in self.tuned if m in METRICS}

    @property
    def primary_improvement(self) -> float:
        return self.delta[self.primary_metric]

    def passes_gate(self, min_improvement: float) -> bool:
        """The registration gate: tuned beats base on the primary metric by at least ``min_improvement``."""
        gain = self.primary_improvement
        return not math.isnan(gain) and gain >= min_improvement


class EvalRecord(Record):
    """eval_report: which adapter was evaluated on which test rows, the MLflow run, and the report."""

    eval_key: str
    adapter_key: str
    run_id: str
    test_digest: str
    report: EvalReport


def build_report(
    spec: EvaluationSpec,
    refs: list[str],
    prompts: list[str],
    base_preds: list[str],
    tuned_preds: list[str],
    base_extra: dict[str, float],
    tuned_extra: dict[str, float],
) -> EvalReport:
    """Score both models; ``*_extra`` carries perplexity and eos_rate measured from the model."""
    base = {**score(base_preds, refs, spec.metrics), **{k: v for k, v in base_extra.items() if k in spec.metrics}}
    tuned = {**score(tuned_preds, refs, spec.metrics), **{k: v for k, v in tuned_extra.items() if k in spec.metrics}}
    base["eos_rate"] = base_extra.get("eos_rate", math.nan)
    tuned["eos_rate"] = tuned_extra.get("eos_rate", math.nan)
    samples = [
        {"prompt": p, "reference": r, "base": b, "tuned": t}
        for p, r, b, t in list(zip(prompts, refs, base_preds, tuned_preds, strict=True))[: spec.n_report_samples]
    ]
    return EvalReport(n_samples=len(refs), primary_metric=spec.primary_metric, base=base, tuned=tuned, samples=samples)


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _cell(text: str, limit: int = 240) -> str:
    t = text.replace("|", "\\|").replace("\n", " ")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def render_markdown(report: EvalReport, title: str) -> str:
    lines = [f"# {title}", "", f"{report.n_samples} test rows; primary metric: **{report.primary_metric}**", ""]
    lines += ["| metric | base | tuned | improvement |", "|---|---|---|---|"]
    for m in report.tuned:
        d = report.delta.get(m, math.nan) if m != "eos_rate" else report.tuned[m] - report.base[m]
        lines.append(f"| {m} | {_fmt(report.base[m])} | {_fmt(report.tuned[m])} | {_fmt(d)} |")
    if report.samples:
        lines += ["", "## Samples", "", "| prompt | reference | base | tuned |", "|---|---|---|---|"]
        for s in report.samples:
            lines.append(
                f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['base'])} | {_cell(s['tuned'])} |"
            )
    return "\n".join(lines) + "\n"
