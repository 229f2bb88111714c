"""eval_report: base, tuned and the current champion on the same test rows (reused while the adapter, test rows,
settings and champion are unchanged)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_pipeline import keys
from finetune_pipeline.evaluation.report import EvalRecord
from finetune_pipeline.layout import AdapterRecord, PipelineLayout
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.datasets import log_splits
from finetune_pipeline.tracking.mlflow_store import ADAPTER_TAG, Lineage
from finetune_pipeline.tracking.tracker import Tracker


@dataclass
class EvalOutcome:
    record: EvalRecord
    reused: bool
    experiment: str
    markdown: str
    plot: bytes | None = None

    def passes_gate(self, spec: LoadedSpec) -> bool:
        return self.record.report.passes_gate(spec.registry.min_improvement_over_base)


def margins(spec: LoadedSpec) -> tuple[dict[str, float], dict[str, float]]:
    """The margins the primary metric's intervals are judged against: over base, over the champion."""
    r, pm = spec.registry, spec.evaluation.primary_metric
    return {pm: r.min_improvement_over_base}, {pm: r.promotion_min_delta}


def champion_source(
    layout: PipelineLayout, spec: LoadedSpec, tracker: Tracker, adapter_key: str, test_digest: str, log: LogFn
) -> Any:
    """The current champion to score on the same rows, or None (no champion, or the champion is this very
    adapter). Loaded from its adapter when that is on this machine (evaluated exactly like a challenger), else
    from the registry's copy of its weights."""
    from finetune_pipeline.evaluation.evaluate import ChampionSource

    name = spec.registry.model_name
    champ = tracker.champion(name)
    if champ is None:
        return None
    akey = champ.tags.get(ADAPTER_TAG, "")
    if akey == adapter_key:
        return None
    cache = layout.champion_outputs(
        champ.version, keys.champion_outputs_key(f"{name}/{champ.version}", test_digest, spec.spec)
    )

    def load() -> tuple[Any, Any]:
        from finetune_pipeline.models.base import load_trained

        if akey and layout.adapter_record(akey).exists():
            rec = AdapterRecord.load(layout.adapter_record(akey))
            log(f"champion v{champ.version}: loading its adapter {akey}")
            return load_trained(layout.read_base().path, spec.model, rec.path)
        log(f"champion v{champ.version}: loading it from the registry")
        return tracker.load_version(name, champ.version)

    return ChampionSource(champ.version, cache, load)


def evaluate_adapter(
    layout: PipelineLayout,
    spec: LoadedSpec,
    adapter_key: str,
    tracker: Tracker,
    lineage: Lineage,
    log: LogFn = print,
) -> EvalOutcome:
    """Generate with base, tuned and the current champion on up to evaluation.max_samples test rows and score
    all three on the same rows, with paired bootstrap intervals. Base outputs are cached by (base weights, test
    rows, settings), the champion's by (version, test rows, settings)."""
    from finetune_pipeline.evaluation.evaluate import evaluate
    from finetune_pipeline.evaluation.interval_plot import interval_plot
    from finetune_pipeline.evaluation.report import render_markdown, with_intervals

    s = spec.spec
    manifest, base = layout.read_manifest(), layout.read_base()
    if not layout.adapter_record(adapter_key).exists():
        raise FileNotFoundError(f"adapter {adapter_key} not found: materialize {spec.name}/adapter first")
    adapter = AdapterRecord.load(layout.adapter_record(adapter_key))
    exp = tracker.experiment_id
    test_digest = manifest.digests["test"]
    champion = champion_source(layout, spec, tracker, adapter_key, test_digest, log)
    ref = f"{s.registry.model_name}/{champion.version}" if champion else None
    key = keys.eval_key(adapter_key, test_digest, s.evaluation, ref)
    m_base, m_champ = margins(spec)
    title = f"{spec.name}: base vs tuned" + (f" vs champion v{champion.version}" if champion else "")
    if layout.eval_record(key).exists():
        rec = EvalRecord.load(layout.eval_record(key))
        report = with_intervals(rec.report, rec.scores, s.evaluation, s.registry.confidence, m_base, m_champ)
        rec = rec.model_copy(update={"report": report})
        log(f"adapter, test data and champion unchanged: reusing eval {key} (MLflow run {rec.run_id})")
        return EvalOutcome(rec, True, exp, render_markdown(report, title), interval_plot(report))
    frames = layout.read_split_frames()
    with tracker.run("eval", lineage, **{"finetune.train_run_id": adapter.train_run_id}) as run:
        log_splits(run, layout, spec, frames, manifest.digests, ["test"])
        report, scores = evaluate(
            base.path,
            s.model,
            adapter.path,
            list(frames["test"]["messages"]),
            s.evaluation,
            s.registry.confidence,
            m_base,
            m_champ,
            base_cache=layout.base_outputs(keys.base_outputs_key(base, test_digest, s)),
            champion=champion,
            log=log,
        )
        for who in ("base", "tuned", "champion"):
            run.log_metrics({f"{who}.{m}": v for m, v in (getattr(report, who) or {}).items()})
        for who, ivs in (("tuned_vs_base", report.vs_base), ("tuned_vs_champion", report.vs_champion)):
            for m, iv in ivs.items():
                run.log_metrics({f"{who}.{m}.delta": iv.delta, f"{who}.{m}.low": iv.low, f"{who}.{m}.high": iv.high})
        md = render_markdown(report, title)
        rec = EvalRecord(
            eval_key=key,
            adapter_key=adapter_key,
            run_id=run.run_id,
            test_digest=test_digest,
            report=report,
            scores=scores,
        )
        layout.eval_markdown(key).parent.mkdir(parents=True, exist_ok=True)
        layout.eval_markdown(key).write_text(md)
        rec.save(layout.eval_record(key))
        run.log_artifact(layout.eval_markdown(key))
        run.log_text(_html(md, title), "report.html")
        run.log_artifact(layout.eval_record(key))
        png = interval_plot(report)
        if png:
            run.log_png(png, "intervals.png")
    return EvalOutcome(rec, False, exp, md, png)


def _html(md: str, title: str) -> str:
    """The markdown report as a standalone HTML page (MLflow's artifact viewer renders HTML, not markdown)."""
    import html

    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body><pre>{html.escape(md)}</pre></body></html>"
