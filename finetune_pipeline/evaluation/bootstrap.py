"""Paired bootstrap confidence intervals for the difference of two models scored on the same rows. Pure numpy.

Every metric is a ratio of row sums, ``sum(num[i]) / sum(den[i])`` (a per-row score has ``den = 1``; perplexity
is ``exp(sum(nll) / sum(tokens))``), so resampling rows and recomputing the statistic on both models with the
same row indices keeps the pairing: the interval is for the *difference*, not two separate intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict


@dataclass(frozen=True)
class RowStat:
    """A metric's per-row contributions: the statistic is ``sum(num) / sum(den)``, ``exp`` of it when ``log``."""

    num: Sequence[float]
    den: Sequence[float] | None = None
    log: bool = False

    def value(self) -> float:
        den = sum(self.den) if self.den is not None else len(self.num)
        if not den:
            return math.nan
        v = sum(self.num) / den
        return math.exp(v) if self.log else v


class Interval(BaseModel):
    """``better - worse`` in the metric's better direction (positive = the candidate is better), with its paired
    bootstrap interval; ``rows_needed`` says how many rows would make the interval exclude ``margin`` at the
    observed difference and spread (None: resolved already, or no number of rows can, the difference being at
    or below the margin)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    metric: str
    candidate: float
    reference: float
    delta: float
    low: float
    high: float
    confidence: float
    n: int
    resamples: int
    seed: int
    margin: float = 0.0
    rows_needed: int | None = None

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    @property
    def resolved(self) -> bool:
        """The interval lies wholly on one side of the margin."""
        return self.low > self.margin or self.high < self.margin

    def describe(self) -> str:
        ci = f"{self.delta:+.4f} [{self.low:+.4f}, {self.high:+.4f}] at {self.confidence:.0%}, n={self.n}"
        if self.rows_needed is not None:
            ci += f"; too few rows to resolve a margin of {self.margin:g}: about {self.rows_needed} needed"
        return ci


def _stat(num, den, idx, log: bool):  # type: ignore[no-untyped-def]
    import numpy as np

    s = num[idx].sum(axis=-1) / den[idx].sum(axis=-1)
    return np.exp(s) if log else s


def paired_interval(
    metric: str,
    candidate: RowStat,
    reference: RowStat,
    higher_is_better: bool,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    margin: float = 0.0,
) -> Interval:
    """Percentile interval of ``candidate - reference`` (sign flipped for lower-is-better metrics) over
    ``resamples`` resamplings of the rows, the same rows for both models. Seeded: the same inputs give the same
    interval."""
    import numpy as np

    n = len(candidate.num)
    if len(reference.num) != n:
        raise ValueError(f"{metric}: {n} candidate rows vs {len(reference.num)} reference rows (not paired)")
    if n == 0:
        raise ValueError(f"{metric}: no rows to compare")
    if candidate.log != reference.log:
        raise ValueError(f"{metric}: the two sides use different statistics")
    sign = 1.0 if higher_is_better else -1.0
    arrays = []
    for side in (candidate, reference):
        num = np.asarray(side.num, dtype=float)
        den = np.asarray(side.den, dtype=float) if side.den is not None else np.ones(n)
        arrays.append((num, den))
    cand_v, ref_v = candidate.value(), reference.value()
    delta = sign * (cand_v - ref_v) + 0.0  # + 0.0: no negative zero
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    diffs = sign * (_stat(*arrays[0], idx, candidate.log) - _stat(*arrays[1], idx, reference.log))
    diffs = diffs[np.isfinite(diffs)] + 0.0
    alpha = (1 - confidence) / 2
    low, high = (float(np.quantile(diffs, q)) + 0.0 for q in (alpha, 1 - alpha)) if len(diffs) else (math.nan, math.nan)
    out = Interval(
        metric=metric,
        candidate=cand_v,
        reference=ref_v,
        delta=delta,
        low=low,
        high=high,
        confidence=confidence,
        n=n,
        resamples=resamples,
        seed=seed,
        margin=margin,
    )
    return out.model_copy(update={"rows_needed": rows_needed(out)})


def rows_needed(iv: Interval) -> int | None:
    """Rows at which the interval, shrinking as 1/sqrt(n) around the observed difference, would exclude the
    margin; None when it already does, or when the difference sits at the margin (no number of rows resolves it)."""
    if iv.resolved or math.isnan(iv.half_width):
        return None
    gap = abs(iv.delta - iv.margin)
    if gap <= 1e-12 or iv.half_width <= 0:
        return None
    return max(iv.n + 1, math.ceil(iv.n * (iv.half_width / gap) ** 2))


def min_detectable_difference(iv: Interval) -> float:
    """The smallest difference this many rows resolve at this spread: the interval's half width."""
    return iv.half_width
