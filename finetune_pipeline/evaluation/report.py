"""Evaluation report: base, tuned and the current champion scored on the same test rows, every delta with its
paired bootstrap interval, the worst regressions side by side, per-label tables, the forgetting probe."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from finetune_pipeline.evaluation.bootstrap import Interval, RowStat, paired_interval
from finetune_pipeline.evaluation.generate import ModelOutputs
from finetune_pipeline.evaluation.metrics import METRICS, higher_is_better, improvement, label_table, row_scores
from finetune_pipeline.layout import Record
from finetune_pipeline.spec import EvaluationSpec


class ModelScores(BaseModel):
    """One model on the test rows: per-row scores of every text metric, per-row reference NLL, its answers."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    rows: dict[str, list[float]]
    nll: list[float]
    tokens: list[int]
    eos_rate: float
    predictions: list[str]

    def stat(self, metric: str) -> RowStat:
        if metric == "perplexity":
            return RowStat(self.nll, self.tokens, log=True)
        return RowStat(self.rows[metric])

    def summary(self, metrics: list[str]) -> dict[str, float]:
        out = {m: self.stat(m).value() for m in metrics if m == "perplexity" or m in self.rows}
        return {**out, "eos_rate": self.eos_rate}


class Forgetting(BaseModel):
    """Perplexity on general text the task never saw, base vs tuned (a warning, never a gate)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    probe: str
    passages: int
    base_perplexity: float
    tuned_perplexity: float
    max_ratio: float

    @property
    def ratio(self) -> float:
        return self.tuned_perplexity / self.base_perplexity

    @property
    def warn(self) -> bool:
        return not self.ratio <= self.max_ratio


class EvalReport(BaseModel):
    """Base, tuned and (when there is one) the champion on the same test rows, with paired intervals."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    n_samples: int
    primary_metric: str
    metrics: list[str] = Field(default_factory=list)
    higher_is_better: dict[str, bool] = Field(default_factory=dict)
    base: dict[str, float]
    tuned: dict[str, float]
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    vs_base: dict[str, Interval] = Field(default_factory=dict)
    vs_champion: dict[str, Interval] = Field(default_factory=dict)
    regressions_vs_base: list[dict[str, Any]] = Field(default_factory=list)
    regressions_vs_champion: list[dict[str, Any]] = Field(default_factory=list)
    labels: dict[str, dict[str, Any]] = Field(default_factory=dict)
    forgetting: Forgetting | None = None
    judge: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def delta(self) -> dict[str, float]:
        return {
            m: (self.tuned[m] - self.base[m]) * (1 if self._higher(m) else -1) for m in self.tuned if m != "eos_rate"
        }

    def _higher(self, metric: str) -> bool:
        if metric in self.higher_is_better:
            return self.higher_is_better[metric]
        return METRICS[metric].higher_is_better if metric in METRICS else True

    @property
    def primary_improvement(self) -> float:
        return self.delta[self.primary_metric]

    def primary_interval(self) -> Interval | None:
        return self.vs_base.get(self.primary_metric)

    def passes_gate(self, min_improvement: float) -> bool:
        """The registration gate: the interval's lower bound of tuned - base on the primary metric is at least
        ``min_improvement`` (a point estimate is used only for reports made before intervals existed)."""
        iv = self.primary_interval()
        gain = iv.low if iv is not None else self.primary_improvement
        return not math.isnan(gain) and gain >= min_improvement


class EvalRecord(Record):
    """eval_report: which adapter was evaluated on which test rows against which champion, and the report."""

    eval_key: str
    adapter_key: str
    run_id: str
    test_digest: str
    report: EvalReport
    scores: dict[str, ModelScores] = Field(default_factory=dict)  # base, tuned, champion: the paired evidence


def score_outputs(out: ModelOutputs, refs: list[str], spec: EvaluationSpec) -> ModelScores:
    eos = sum(out.eos_reached) / len(out.eos_reached) if out.eos_reached else math.nan
    return ModelScores(
        rows=row_scores(out.predictions, refs, spec),
        nll=out.row_nll,
        tokens=out.row_tokens,
        eos_rate=eos,
        predictions=out.predictions,
    )


def intervals(
    candidate: ModelScores,
    reference: ModelScores,
    spec: EvaluationSpec,
    confidence: float,
    margins: dict[str, float] | None = None,
) -> dict[str, Interval]:
    """candidate - reference for every metric, paired over the same rows, seeded by evaluation.bootstrap_seed."""
    return {
        m: paired_interval(
            m,
            candidate.stat(m),
            reference.stat(m),
            higher_is_better(m, spec),
            confidence,
            spec.bootstrap_resamples,
            spec.bootstrap_seed,
            (margins or {}).get(m, 0.0),
        )
        for m in spec.metrics
    }


def worst_rows(
    candidate: ModelScores,
    reference: ModelScores,
    metric: str,
    prompts: list[str],
    refs: list[str],
    k: int,
    spec: EvaluationSpec,
) -> list[dict[str, Any]]:
    """The ``k`` rows where the candidate loses most against the reference on ``metric`` (per-row NLL for
    perplexity), side by side; rows where it does not lose are left out."""
    if metric == "perplexity":
        a = [n / max(t, 1) for n, t in zip(candidate.nll, candidate.tokens, strict=True)]
        b = [n / max(t, 1) for n, t in zip(reference.nll, reference.tokens, strict=True)]
    else:
        a, b = candidate.rows[metric], reference.rows[metric]
    loss = [-improvement(metric, x, y, spec) for x, y in zip(a, b, strict=True)]
    order = sorted((i for i in range(len(loss)) if loss[i] > 0), key=lambda i: (-loss[i], i))[:k]
    return [
        {
            "row": i,
            "prompt": prompts[i],
            "reference": refs[i],
            "candidate": candidate.predictions[i],
            "compared": reference.predictions[i],
            "loss": loss[i],
        }
        for i in order
    ]


def build_report(
    spec: EvaluationSpec,
    refs: list[str],
    prompts: list[str],
    scores: dict[str, ModelScores],
    confidence: float,
    margins_base: dict[str, float] | None = None,
    margins_champion: dict[str, float] | None = None,
    champion_version: str | None = None,
    forgetting: Forgetting | None = None,
) -> EvalReport:
    """The report from the models' per-row scores (``base``, ``tuned`` and optionally ``champion``)."""
    base, tuned, champ = scores["base"], scores["tuned"], scores.get("champion")
    k, pm = spec.n_report_samples, spec.primary_metric
    labels = {f: {name: label_table(s.predictions, refs, f) for name, s in scores.items()} for f in spec.label_fields}
    return EvalReport(
        n_samples=len(refs),
        primary_metric=pm,
        metrics=list(spec.metrics),
        higher_is_better={m: higher_is_better(m, spec) for m in spec.metrics},
        base=base.summary(spec.metrics),
        tuned=tuned.summary(spec.metrics),
        champion=champ.summary(spec.metrics) if champ else None,
        champion_version=champion_version,
        vs_base=intervals(tuned, base, spec, confidence, margins_base),
        vs_champion=intervals(tuned, champ, spec, confidence, margins_champion) if champ else {},
        regressions_vs_base=worst_rows(tuned, base, pm, prompts, refs, k, spec),
        regressions_vs_champion=worst_rows(tuned, champ, pm, prompts, refs, k, spec) if champ else [],
        labels=labels,
        forgetting=forgetting,
        samples=[
            {"prompt": p, "reference": r, "base": b, "tuned": t}
            for p, r, b, t in list(zip(prompts, refs, base.predictions, tuned.predictions, strict=True))[:k]
        ],
    )


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _cell(text: str, limit: int = 240) -> str:
    t = str(text).replace("|", "\\|").replace("\n", " ")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _ci(iv: Interval | None) -> str:
    if iv is None:
        return "n/a"
    return f"{iv.delta:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]"


def render_markdown(report: EvalReport, title: str) -> str:
    conf = next(iter(report.vs_base.values())).confidence if report.vs_base else 0.95
    champ = report.champion_version
    lines = [
        f"# {title}",
        "",
        f"{report.n_samples} test rows, scored for every model; primary metric: **{report.primary_metric}**; "
        f"deltas are candidate minus compared, in the metric's better direction (positive = better), with "
        f"{conf:.0%} paired bootstrap intervals.",
        "",
    ]
    head = "| metric | base | tuned | tuned - base |"
    sep = "|---|---|---|---|"
    if champ:
        head += f" champion v{champ} | tuned - champion v{champ} |"
        sep += "---|---|"
    lines += [head, sep]
    for m in report.tuned:
        if m == "eos_rate":
            row = (
                f"| {m} | {_fmt(report.base[m])} | {_fmt(report.tuned[m])} | {_fmt(report.tuned[m] - report.base[m])} |"
            )
            if champ and report.champion:
                row += f" {_fmt(report.champion.get(m))} | |"
        else:
            row = f"| {m} | {_fmt(report.base[m])} | {_fmt(report.tuned[m])} | {_ci(report.vs_base.get(m))} |"
            if champ and report.champion:
                row += f" {_fmt(report.champion.get(m))} | {_ci(report.vs_champion.get(m))} |"
        lines.append(row)
    unresolved = [
        iv
        for iv in [report.vs_base.get(report.primary_metric), report.vs_champion.get(report.primary_metric)]
        if iv and iv.rows_needed
    ]
    for iv in unresolved:
        lines += ["", f"Too few rows: {iv.metric} {iv.describe()}."]
    if report.forgetting:
        f = report.forgetting
        verdict = "WARNING: possible forgetting" if f.warn else "ok"
        lines += [
            "",
            "## Forgetting probe",
            "",
            f"Perplexity on {f.passages} general-text passages ({f.probe}): base {_fmt(f.base_perplexity)}, "
            f"tuned {_fmt(f.tuned_perplexity)}, ratio {f.ratio:.3f} (threshold {f.max_ratio}): {verdict}.",
        ]
    for title_, rows in (
        ("Worst regressions against base", report.regressions_vs_base),
        (f"Worst regressions against champion v{champ}", report.regressions_vs_champion),
    ):
        if rows:
            lines += [
                "",
                f"## {title_} ({report.primary_metric})",
                "",
                "| row | prompt | reference | tuned | compared | loss |",
                "|---|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['row']} | {_cell(r['prompt'])} | {_cell(r['reference'])} | {_cell(r['candidate'])} | "
                    f"{_cell(r['compared'])} | {r['loss']:.4f} |"
                )
    for field, per_model in report.labels.items():
        lines += [
            "",
            f"## Labels: {field}",
            "",
            "| label | model | precision | recall | f1 | support |",
            "|---|---|---|---|---|---|",
        ]
        for model, tab in per_model.items():
            for lab, v in tab["per_label"].items():
                lines.append(
                    f"| {_cell(lab, 40)} | {model} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
                )
        tab = per_model.get("tuned")
        if tab:
            labs = tab["labels"]
            lines += [
                "",
                f"Confusion (tuned; rows = reference, columns = predicted) for {field}:",
                "",
                "| | " + " | ".join(_cell(x, 20) for x in labs) + " |",
                "|---" * (len(labs) + 1) + "|",
            ]
            for g in labs:
                lines.append(f"| {_cell(g, 20)} | " + " | ".join(str(tab["confusion"][g][p]) for p in labs) + " |")
    if report.judge:
        lines += ["", "## LLM judge", "", f"{report.judge.get('summary', '')}"]
    if report.samples:
        lines += ["", "## Samples", "", "| prompt | reference | base | tuned |", "|---|---|---|---|"]
        for s in report.samples:
            lines.append(
                f"| {_cell(s['prompt'])} | {_cell(s['reference'])} | {_cell(s['base'])} | {_cell(s['tuned'])} |"
            )
    return "\n".join(lines) + "\n"


def with_intervals(
    report: EvalReport,
    scores: dict[str, ModelScores],
    spec: EvaluationSpec,
    confidence: float,
    margins_base: dict[str, float] | None = None,
    margins_champion: dict[str, float] | None = None,
) -> EvalReport:
    """The report's intervals recomputed from the stored per-row scores at the current confidence and margins
    (decisions are not part of the evaluation key: changing them re-decides without re-generating)."""
    if not scores:
        return report
    champ = scores.get("champion")
    return report.model_copy(
        update={
            "vs_base": intervals(scores["tuned"], scores["base"], spec, confidence, margins_base),
            "vs_champion": intervals(scores["tuned"], champ, spec, confidence, margins_champion) if champ else {},
        }
    )
