"""The evaluation's plot: every metric's delta with its paired bootstrap interval (PNG bytes)."""

from __future__ import annotations

from finetune_pipeline.evaluation.report import EvalReport
from finetune_pipeline.plots import _figure, _png


def interval_plot(report: EvalReport) -> bytes | None:
    """One row per metric: tuned - base (and tuned - champion) with the interval as error bars; zero marked."""
    if not report.vs_base:
        return None
    metrics = list(report.vs_base)
    fig, ax = _figure((7.0, 0.6 + 0.55 * len(metrics)))
    series = [("tuned - base", report.vs_base, -0.12, "tab:blue")]
    if report.vs_champion:
        series.append((f"tuned - champion v{report.champion_version}", report.vs_champion, 0.12, "tab:orange"))
    for label, ivs, off, color in series:
        ys = [i + off for i in range(len(metrics))]
        d = [ivs[m].delta for m in metrics]
        lo = [ivs[m].delta - ivs[m].low for m in metrics]
        hi = [ivs[m].high - ivs[m].delta for m in metrics]
        ax.errorbar(d, ys, xerr=[lo, hi], fmt="o", capsize=3, label=label, color=color)
    ax.axvline(0.0, color="grey", linewidth=1)
    ax.set_yticks(range(len(metrics)), metrics)
    conf = next(iter(report.vs_base.values())).confidence
    ax.set_xlabel(f"difference (positive = tuned better), {conf:.0%} paired bootstrap interval, n={report.n_samples}")
    ax.legend(loc="best", fontsize=8)
    return _png(fig)
