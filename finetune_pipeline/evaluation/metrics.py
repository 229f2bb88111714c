"""Pure metrics on (prediction, reference) strings. No torch here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, get_args

from finetune_pipeline.spec import MetricName


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The text as a JSON object, or None (surrounding whitespace and a ```json fence are tolerated)."""
    t = text.strip()
    if t.startswith("```"):
        t = t.strip("`").removeprefix("json").strip()
    try:
        v = json.loads(t)
    except (json.JSONDecodeError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def exact_match(pred: str, ref: str) -> float:
    """1.0 when equal: as JSON objects when the reference is one (key order and spacing ignored), else as stripped text."""
    ref_obj = parse_json_object(ref)
    if ref_obj is not None:
        return float(parse_json_object(pred) == ref_obj)
    return float(pred.strip() == ref.strip())


def json_valid(pred: str) -> float:
    return float(parse_json_object(pred) is not None)


def field_accuracy(pred: str, ref: str) -> float:
    """Share of the reference object's keys whose value the prediction gets right (0 for invalid JSON)."""
    ref_obj = parse_json_object(ref)
    if not ref_obj:
        return exact_match(pred, ref)
    pred_obj = parse_json_object(pred) or {}
    return sum(pred_obj.get(k) == v for k, v in ref_obj.items()) / len(ref_obj)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(pred: str, ref: str) -> float:
    return float(_rouge().score(ref, pred)["rougeL"].fmeasure)


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: its name in the spec, how a row is scored, and which direction is better."""

    name: str
    per_row: Callable[[str, str], float] | None  # (prediction, reference) -> score; None: measured from the model
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", exact_match, True),
        Metric("json_valid", lambda p, r: json_valid(p), True),
        Metric("rouge_l", rouge_l, True),
        Metric("field_accuracy", field_accuracy, True),
        Metric("perplexity", None, False),  # from the logits of the reference answers (evaluation.generate)
    )
}
assert set(METRICS) == set(get_args(MetricName)), "the metric table and the spec's metric names must agree"


def score(preds: Sequence[str], refs: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """Mean of each per-row metric (perplexity is computed from logits elsewhere and skipped here)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    out: dict[str, float] = {}
    for m in metrics:
        fn = METRICS[m].per_row if m in METRICS else None
        if fn is not None:
            out[m] = sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / max(len(refs), 1)
    return out


def improvement(metric: str, new: float, old: float) -> float:
    """How much better ``new`` is than ``old`` in the metric's direction (positive = better)."""
    if math.isnan(new) or math.isnan(old):
        return math.nan
    return new - old if METRICS[metric].higher_is_better else old - new
