"""Is the data ready to fine-tune on? Rows per split against the guides' minimums, whether the test split can
resolve the evaluation gate's margin, label balance, the token budget, and a plain-language verdict.

Pure functions: the stage (stages/readiness.py) feeds them the splits, the token statistics and the last
calibration, the asset maps the result to metadata and checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

MIN_TRAIN_ROWS = 100  # the guides: under 100 examples is too few to fine-tune a task
RECOMMENDED_TRAIN_ROWS = 500  # the guides: 500-1,000 examples recommended per task
MAX_LABEL_RATIO = 10.0  # largest / smallest class count above this warns
DEFAULT_CONFIDENCE = 0.95  # the evaluation gate's confidence when the spec names none
DEFAULT_POWER = 0.8
REFERENCE_EFFECT = 0.05  # the difference readiness checks for when the gate's margin is 0 ("any improvement")


def _z(confidence: float, power: float) -> float:
    return NormalDist().inv_cdf(confidence) + NormalDist().inv_cdf(power)


def min_detectable_difference(n: int, confidence: float = DEFAULT_CONFIDENCE, power: float = DEFAULT_POWER) -> float:
    """Smallest difference of a per-row score in [0, 1] (exact match, accuracy...) between two models scored on
    the same n rows that a one-sided test at ``confidence`` detects with probability ``power``.

    The two-proportion approximation at its worst case (both rates near 0.5, rows treated as independent):
    ``(z_conf + z_power) * sqrt(2 * 0.25 / n)``. Pairing only narrows the interval, so this is conservative."""
    if n <= 0:
        return math.inf
    return _z(confidence, power) * math.sqrt(0.5 / n)


def rows_needed(margin: float, confidence: float = DEFAULT_CONFIDENCE, power: float = DEFAULT_POWER) -> int:
    """Test rows needed for ``min_detectable_difference`` to reach ``margin`` (its inverse)."""
    if margin <= 0:
        raise ValueError("margin must be > 0")
    return math.ceil(0.5 * (_z(confidence, power) / margin) ** 2)


def label_ratio(counts: dict[str, int]) -> float | None:
    """Largest over smallest class count (None without labels or with a single class)."""
    values = [v for v in counts.values() if v > 0]
    if len(values) < 2:
        return None
    return max(values) / min(values)


@dataclass
class Readiness:
    """What the readiness check found, and what to do about it."""

    rows: dict[str, int]
    eval_rows: int  # test rows the evaluation scores (min of the test split and evaluation.max_samples)
    confidence: float
    confidence_source: str
    margin: float  # the difference the gate must resolve
    detectable: float  # smallest difference the evaluated test rows can resolve
    rows_for_margin: int
    label_ratio: float | None
    train_tokens: float | None  # tokens the training run will see (planned steps x batch x mean row length)
    estimated_seconds: float | None  # from the last calibration (tokens per second), when there is one
    verdict: str
    reasons: list[str] = field(default_factory=list)
    blocking: list[str] = field(default_factory=list)  # unmet spec minimums, each with what to do
    epoch_seconds: float | None = None  # one pass over the training rows at the last measured tokens/s
    budget_epochs: float | None = None  # passes over the training rows training.max_minutes buys at that pace
    budget_warning: str | None = None  # set when the time budget covers less than one epoch

    @property
    def budget_covers_an_epoch(self) -> bool:
        return self.budget_epochs is None or self.budget_epochs >= 1.0

    @property
    def test_resolves_gate(self) -> bool:
        return self.detectable <= self.margin

    @property
    def labels_balanced(self) -> bool:
        return self.label_ratio is None or self.label_ratio <= MAX_LABEL_RATIO

    @property
    def enough_train_rows(self) -> bool:
        return self.rows.get("train", 0) >= MIN_TRAIN_ROWS

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "rows": self.rows,
            "eval_rows": self.eval_rows,
            "confidence": self.confidence,
            "confidence_source": self.confidence_source,
            "margin": round(self.margin, 4),
            "detectable_difference": round(self.detectable, 4),
            "rows_for_margin": self.rows_for_margin,
            "label_ratio": None if self.label_ratio is None else round(self.label_ratio, 2),
            "train_tokens": None if self.train_tokens is None else round(self.train_tokens),
            "estimated_seconds": None if self.estimated_seconds is None else round(self.estimated_seconds, 1),
            "blocking": self.blocking,
            "epoch_minutes": None if self.epoch_seconds is None else round(self.epoch_seconds / 60, 1),
            "budget_epochs": None if self.budget_epochs is None else round(self.budget_epochs, 3),
        }


def assess(
    rows: dict[str, int],
    *,
    max_eval_samples: int,
    gate_margin: float,
    confidence: float | None = None,
    label_counts: dict[str, int] | None = None,
    mean_train_tokens: float | None = None,
    tokens_per_step_rows: int = 0,
    max_steps: int | None = 0,
    tokens_per_second: float | None = None,
    budget_minutes: float | None = None,
    min_train_rows: int | None = None,
    min_test_rows: int | None = None,
) -> Readiness:
    """The readiness of splits with ``rows`` per split for a gate requiring ``gate_margin`` (0 = any improvement:
    then REFERENCE_EFFECT is what the test split must resolve).

    ``max_steps``: the run's planned optimizer steps (from ``training.max_steps`` or ``num_train_epochs``; None or
    0: unknown, no token budget); ``budget_minutes``: ``training.max_minutes``. With a measured ``tokens_per_second``
    the time of one epoch is known, and a budget that covers less than one epoch is reported with that time."""
    conf, source = (confidence, "spec") if confidence is not None else (DEFAULT_CONFIDENCE, "default (0.95)")
    eval_rows = min(rows.get("test", 0), max_eval_samples)
    margin = gate_margin if gate_margin > 0 else REFERENCE_EFFECT
    detectable = min_detectable_difference(eval_rows, conf)
    needed = rows_needed(margin, conf)
    ratio = label_ratio(label_counts or {})
    train = rows.get("train", 0)
    steps = int(max_steps or 0)
    tokens = mean_train_tokens * tokens_per_step_rows * steps if mean_train_tokens is not None and steps else None
    seconds = tokens / tokens_per_second if tokens is not None and tokens_per_second else None
    epoch_s = train * mean_train_tokens / tokens_per_second if mean_train_tokens and tokens_per_second else None
    budget_epochs = budget_minutes * 60 / epoch_s if budget_minutes and epoch_s else None
    if seconds is not None and budget_minutes:
        seconds = min(seconds, budget_minutes * 60)  # the budget caps the run
    reasons: list[str] = []
    if train < MIN_TRAIN_ROWS:
        reasons.append(
            f"{train} training rows: under {MIN_TRAIN_ROWS} is too few to fine-tune; show a few of them as "
            "examples in the prompt, or collect more"
        )
    elif train < RECOMMENDED_TRAIN_ROWS:
        reasons.append(f"{train} training rows: {RECOMMENDED_TRAIN_ROWS}-1,000 are recommended for a task")
    if detectable > margin:
        what = f"the gate's margin {gate_margin:g}" if gate_margin > 0 else f"a {margin:g} improvement"
        reasons.append(
            f"{eval_rows} evaluated test rows resolve differences of {detectable:.3f} or more at {conf:g} confidence, "
            f"not {what}: about {needed} are needed (raise split.test_fraction or evaluation.max_samples, or add data)"
        )
    if ratio is not None and ratio > MAX_LABEL_RATIO:
        reasons.append(f"labels unbalanced: the largest class is {ratio:.1f}x the smallest (over {MAX_LABEL_RATIO:g})")
    if train < MIN_TRAIN_ROWS:
        verdict = "few-shot may be enough"
    elif train < RECOMMENDED_TRAIN_ROWS or detectable > margin:
        verdict = "collect more data"
    else:
        verdict = "fine-tune"
    budget_warning = None
    if budget_epochs is not None and epoch_s is not None and budget_epochs < 1.0:
        budget_warning = (
            f"training.max_minutes: {budget_minutes:g} covers about {budget_epochs:.2f} of an epoch: one pass over "
            f"the {train} training rows takes about {epoch_s / 60:.1f} minutes here (at {tokens_per_second:.0f} "
            "tokens/s, the last adapter's measured pace); raise training.max_minutes to about "
            f"{math.ceil(epoch_s / 60)} for one epoch, or accept that part of the data is never trained on"
        )
        reasons.append(budget_warning)
    blocking = []
    if min_train_rows is not None and train < min_train_rows:
        blocking.append(
            f"{train} training rows < split.min_train_rows={min_train_rows}: drop more data into the incoming "
            "folder, lower split.validation_fraction / split.test_fraction, or lower split.min_train_rows"
        )
    if min_test_rows is not None and rows.get("test", 0) < min_test_rows:
        blocking.append(
            f"{rows.get('test', 0)} test rows < split.min_test_rows={min_test_rows}: add data, raise "
            "split.test_fraction, or lower split.min_test_rows"
        )
    return Readiness(
        rows=dict(rows),
        eval_rows=eval_rows,
        confidence=conf,
        confidence_source=source,
        margin=margin,
        detectable=detectable,
        rows_for_margin=needed,
        label_ratio=ratio,
        train_tokens=tokens,
        estimated_seconds=seconds,
        verdict=verdict,
        reasons=reasons,
        blocking=blocking,
        epoch_seconds=epoch_s,
        budget_epochs=budget_epochs,
        budget_warning=budget_warning,
    )
