"""What "better than the champion" means: a pure decision that tracking records and the registry applies."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_pipeline.evaluation.metrics import improvement


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    champion_score: float | None


def decide(
    version: str,
    metric: str,
    score: float,
    champion_version: str | None,
    champion_score: float | None,
    min_delta: float,
) -> Decision:
    """Promote when there is no champion, the version already is it, the champion has no score, or the version
    beats the champion on ``metric`` by more than ``min_delta`` (in the metric's better direction)."""
    if champion_version is None:
        return Decision(True, "no champion yet", None)
    if champion_version == version:
        return Decision(True, f"v{version} is already the champion", champion_score)
    if champion_score is None:
        return Decision(True, f"champion v{champion_version} has no {metric} score", None)
    gain = improvement(metric, score, champion_score)
    return Decision(
        gain > min_delta,
        f"{metric} {score:.4f} vs champion v{champion_version} {champion_score:.4f} "
        f"(improvement {gain:+.4f}, needs > {min_delta})",
        champion_score,
    )
