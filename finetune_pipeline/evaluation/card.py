"""The model card and the evidence tags a registered version carries: what was decided, on which rows, with
which intervals, against which champion. Pure text; tracking stores it."""

from __future__ import annotations

import math
from typing import Any

from finetune_pipeline.evaluation.promotion import Decision
from finetune_pipeline.evaluation.report import EvalRecord


def _f(v: float | None) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def evidence_tags(ev: EvalRecord, decision: Decision, seed: int, resamples: int) -> dict[str, str]:
    """Version tags: the decision and every number it rests on (tag values are strings)."""
    r = ev.report
    tags = {
        "finetune.decision.promoted": str(decision.promote).lower(),
        "finetune.decision.reason": decision.reason[:4900],
        "finetune.decision.compared_with": decision.compared_with or "",
        "finetune.eval.primary_metric": r.primary_metric,
        "finetune.eval.n": str(r.n_samples),
        "finetune.eval.test_digest": ev.test_digest,
        "finetune.eval.eval_key": ev.eval_key,
        "finetune.eval.champion_version": r.champion_version or "",
        "finetune.eval.bootstrap_seed": str(seed),
        "finetune.eval.bootstrap_resamples": str(resamples),
    }
    for m, v in r.tuned.items():
        tags[f"metric.{m}"] = _f(v)
    for prefix, ivs in (("vs_base", r.vs_base), ("vs_champion", r.vs_champion)):
        for m, iv in ivs.items():
            tags[f"finetune.{prefix}.{m}"] = f"{_f(iv.delta)} [{_f(iv.low)}, {_f(iv.high)}] @{iv.confidence:g}"
    return tags


def model_card(
    name: str,
    version: str,
    ev: EvalRecord,
    decision: Decision,
    facts: dict[str, Any],
    description: str,
) -> str:
    """Markdown model card for the version description: data, base, method, metrics with intervals, use, limits."""
    r = ev.report
    conf = next(iter(r.vs_base.values())).confidence if r.vs_base else 0.95
    lines = [
        f"# {name} v{version}",
        "",
        description or "Fine-tuned by finetune_pipeline.",
        "",
        f"**Decision:** {'promoted to champion' if decision.promote else 'not promoted'}: {decision.reason}",
        "",
        "## Training",
        "",
        *[f"- {k}: {v}" for k, v in facts.items()],
        "",
        f"## Evaluation ({r.n_samples} test rows, test split digest {ev.test_digest}, {conf:.0%} paired bootstrap)",
        "",
        "| metric | tuned | base | tuned - base [interval] |"
        + (f" champion v{r.champion_version} | tuned - champion [interval] |" if r.champion else ""),
        "|---|---|---|---|" + ("---|---|" if r.champion else ""),
    ]
    for m in r.vs_base:
        b, c = r.vs_base[m], r.vs_champion.get(m)
        row = f"| {m} | {_f(r.tuned.get(m))} | {_f(r.base.get(m))} | {b.delta:+.4f} [{b.low:+.4f}, {b.high:+.4f}] |"
        if r.champion:
            row += f" {_f(r.champion.get(m))} | " + (
                f"{c.delta:+.4f} [{c.low:+.4f}, {c.high:+.4f}] |" if c else "n/a |"
            )
        lines.append(row)
    if r.forgetting:
        f = r.forgetting
        lines += [
            "",
            f"Forgetting probe: general-text perplexity base {_f(f.base_perplexity)} -> tuned {_f(f.tuned_perplexity)} (ratio {f.ratio:.3f}, warn above {f.max_ratio}).",
        ]
    lines += [
        "",
        "## Intended use",
        "",
        "The task of the training data, with the chat template and generation settings it was evaluated with "
        "(served by `mlflow models serve`; greedy by default).",
        "",
        "## Limits",
        "",
        f"- Measured on {r.n_samples} held-out rows from the same source as the training data; other inputs are untested.",
        "- Intervals cover sampling noise of the test rows, not a shift in the data.",
        "- A small model fine-tuned on a narrow task: check answers before acting on them.",
    ]
    return "\n".join(lines) + "\n"
