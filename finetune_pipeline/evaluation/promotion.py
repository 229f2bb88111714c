"""What "better than the champion" means: a pure decision on paired evidence, that tracking records and the
registry applies. The challenger and the champion were scored on the same test rows (evaluation.evaluate); the
decision reads the lower bound of the paired bootstrap interval, never a point estimate or a stored number."""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune_pipeline.evaluation.report import EvalReport


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    compared_with: str | None  # the champion version the evidence was measured against


def floor_failures(values: dict[str, float], floors: dict[str, float], higher: dict[str, bool]) -> list[str]:
    """Metrics below their absolute floor (above it, for lower-is-better metrics like perplexity)."""
    out = []
    for m, f in sorted(floors.items()):
        v = values.get(m, math.nan)
        ok = v >= f if higher.get(m, True) else v <= f
        if not ok:
            out.append(f"{m} {v:.4f} {'<' if higher.get(m, True) else '>'} floor {f}")
    return out


def decide(
    version: str,
    report: EvalReport,
    champion_now: str | None,
    min_delta: float,
    floors: dict[str, float],
) -> Decision:
    """Promote when the version passes every floor and either there is no champion, or the lower bound of
    challenger - champion on the primary metric (same rows, paired bootstrap) is above ``min_delta``. Evidence
    measured against another champion than the current one never promotes."""
    pm = report.primary_metric
    if champion_now == version:
        return Decision(True, f"v{version} is already the champion", version)
    failed = floor_failures(report.tuned, floors, {m: report._higher(m) for m in report.tuned})
    if failed:
        return Decision(False, "below floor: " + "; ".join(failed), champion_now)
    if champion_now is None:
        return Decision(True, "no champion yet", None)
    if report.champion_version != champion_now:
        return Decision(
            False,
            f"the evaluation compared against champion v{report.champion_version}, but the champion is now "
            f"v{champion_now}: re-materialize eval_report so both are scored on the same rows",
            champion_now,
        )
    iv = report.vs_champion.get(pm)
    if iv is None:
        return Decision(False, f"no paired {pm} evidence against champion v{champion_now}", champion_now)
    head = f"{pm} challenger - champion v{champion_now}: {iv.describe()}"
    if iv.low > min_delta:
        return Decision(True, f"{head}; lower bound {iv.low:+.4f} > {min_delta}", champion_now)
    return Decision(False, f"{head}; lower bound {iv.low:+.4f} not above {min_delta}: champion kept", champion_now)
