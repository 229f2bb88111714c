"""Pure metrics on (prediction, reference) strings, scored per row so that comparisons can be paired. No torch here.

Maintained libraries do the scoring where one exists: sacrebleu (BLEU, chrF), rouge-score (ROUGE-1/2/L),
jsonschema (schema compliance). Custom metrics are ``module:function`` references called per row.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, get_args

from finetune_pipeline.spec import EvaluationSpec, MetricName

RowFn = Callable[[str, str], float]


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


_TOKEN = re.compile(r"\w+|[^\w\s]")


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style token-overlap F1 (lower-cased word and punctuation tokens; 1.0 when both are empty)."""
    p, r = _TOKEN.findall(pred.lower()), _TOKEN.findall(ref.lower())
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def _rouge_f(kind: str) -> RowFn:
    return lambda pred, ref: float(_rouge().score(ref, pred)[kind].fmeasure)


rouge_l = _rouge_f("rougeL")


def bleu(pred: str, ref: str) -> float:
    """Sentence BLEU from sacrebleu (effective order, so short answers are not zeroed), scaled to 0..1."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(pred, [ref]).score) / 100.0


def chrf(pred: str, ref: str) -> float:
    """Sentence chrF from sacrebleu, scaled to 0..1."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(pred, [ref]).score) / 100.0


def json_schema_valid(pred: str, schema: dict[str, Any] | None) -> float:
    """1.0 when the prediction is a JSON object that validates against ``evaluation.json_schema`` (jsonschema)."""
    if schema is None:
        raise ValueError("metric json_schema needs evaluation.json_schema (a JSON Schema for the answers)")
    import jsonschema

    obj = parse_json_object(pred)
    if obj is None:
        return 0.0
    return float(jsonschema.Draft202012Validator(schema).is_valid(obj))


@dataclass(frozen=True)
class Metric:
    """One row of the metric table: its name in the spec, how a row is scored, and which direction is better."""

    name: str
    per_row: RowFn | None  # (prediction, reference) -> score; None: measured from the model (or needs the spec)
    higher_is_better: bool


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("exact_match", exact_match, True),
        Metric("token_f1", token_f1, True),
        Metric("bleu", bleu, True),
        Metric("chrf", chrf, True),
        Metric("rouge_1", _rouge_f("rouge1"), True),
        Metric("rouge_2", _rouge_f("rouge2"), True),
        Metric("rouge_l", rouge_l, True),
        Metric("json_valid", lambda p, r: json_valid(p), True),
        Metric("json_schema", None, True),  # per row against evaluation.json_schema (row_function)
        Metric("field_accuracy", field_accuracy, True),
        Metric("perplexity", None, False),  # from the logits of the reference answers (evaluation.generate)
    )
}
assert set(METRICS) == set(get_args(MetricName)), "the metric table and the spec's metric names must agree"


def load_custom(ref: str) -> RowFn:
    """A ``module:function`` reference, imported; the function takes (prediction, reference) and returns a float."""
    mod, _, fn = ref.partition(":")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"custom metric '{ref}' cannot be imported ({exc}): give an importable module:function"
        ) from exc
    if not callable(f):
        raise ValueError(f"custom metric '{ref}' is not callable")
    return f  # type: ignore[no-any-return]


def higher_is_better(metric: str, spec: EvaluationSpec | None = None) -> bool:
    if metric in METRICS:
        return METRICS[metric].higher_is_better
    if spec is not None and metric in spec.custom_metrics:
        return spec.custom_metrics[metric].higher_is_better
    raise KeyError(f"unknown metric {metric}")


def row_function(metric: str, spec: EvaluationSpec) -> RowFn | None:
    """How one row is scored for ``metric`` under ``spec`` (None: perplexity, measured from the model)."""
    if metric == "json_schema":
        schema = spec.json_schema
        return lambda p, r: json_schema_valid(p, schema)
    if metric in spec.custom_metrics:
        return load_custom(spec.custom_metrics[metric].function)
    return METRICS[metric].per_row


def row_scores(preds: Sequence[str], refs: Sequence[str], spec: EvaluationSpec) -> dict[str, list[float]]:
    """Each text metric of the spec, one score per row (perplexity comes from the model, not from here)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    out: dict[str, list[float]] = {}
    for m in spec.metrics:
        fn = row_function(m, spec)
        if fn is not None:
            out[m] = [float(fn(p, r)) for p, r in zip(preds, refs, strict=True)]
    return out


def score(preds: Sequence[str], refs: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """Mean of each built-in per-row metric (perplexity is computed from logits elsewhere and skipped here)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    out: dict[str, float] = {}
    for m in metrics:
        fn = METRICS[m].per_row if m in METRICS else None
        if fn is not None:
            out[m] = sum(fn(p, r) for p, r in zip(preds, refs, strict=True)) / max(len(refs), 1)
    return out


def improvement(metric: str, new: float, old: float, spec: EvaluationSpec | None = None) -> float:
    """How much better ``new`` is than ``old`` in the metric's direction (positive = better)."""
    if math.isnan(new) or math.isnan(old):
        return math.nan
    return new - old if higher_is_better(metric, spec) else old - new


def label_table(preds: Sequence[str], refs: Sequence[str], field: str) -> dict[str, Any]:
    """Per-label precision / recall / F1 and the confusion counts of one categorical JSON field (an invalid or
    missing prediction counts as the label ``<missing>``)."""
    gold = [str((parse_json_object(r) or {}).get(field, "<missing>")) for r in refs]
    got = [str((parse_json_object(p) or {}).get(field, "<missing>")) for p in preds]
    labels = sorted(set(gold) | set(got))
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, got, strict=True):
        confusion[g][p] += 1
    per_label = {}
    for lab in labels:
        tp = confusion[lab][lab]
        fp = sum(confusion[g][lab] for g in labels) - tp
        fn = sum(confusion[lab].values()) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per_label[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
    return {"field": field, "labels": labels, "per_label": per_label, "confusion": confusion}
