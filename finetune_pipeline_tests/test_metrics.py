"""Tier 1: evaluation metrics and the promotion direction."""

import math

import pytest

from finetune_pipeline.evaluation.metrics import exact_match, field_accuracy, improvement, json_valid, rouge_l, score
from finetune_pipeline.evaluation.report import build_report, render_markdown
from finetune_pipeline.spec import EvaluationSpec

REF = '{"category": "billing", "priority": "high", "product": "PayFlow", "sentiment": "negative"}'


@pytest.mark.parametrize(
    ("pred", "em", "valid", "fields"),
    [
        (REF, 1.0, 1.0, 1.0),
        ('{"priority":"high","category":"billing","product":"PayFlow","sentiment":"negative"}', 1.0, 1.0, 1.0),
        ("```json\n" + REF + "\n```", 1.0, 1.0, 1.0),
        ('{"category": "billing", "priority": "low", "product": "PayFlow", "sentiment": "neutral"}', 0.0, 1.0, 0.5),
        ('{"category": "billing", "priority": "high"', 0.0, 0.0, 0.0),
        ("I cannot help with that.", 0.0, 0.0, 0.0),
        ("[1, 2]", 0.0, 0.0, 0.0),
    ],
)
def test_json_metrics(pred: str, em: float, valid: float, fields: float) -> None:
    assert exact_match(pred, REF) == em
    assert json_valid(pred) == valid
    assert field_accuracy(pred, REF) == fields


def test_text_metrics() -> None:
    assert exact_match(" hello ", "hello") == 1.0
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert 0 < rouge_l("the cat sat down", "the cat sat") < 1
    assert rouge_l("", "the cat") == 0.0
    assert score(["a", "b"], ["a", "c"], ["exact_match", "perplexity"]) == {"exact_match": 0.5}
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"], ["exact_match"])


def test_improvement_direction() -> None:
    assert improvement("exact_match", 0.8, 0.5) == pytest.approx(0.3)
    assert improvement("perplexity", 2.0, 5.0) == pytest.approx(3.0)
    assert improvement("perplexity", 6.0, 5.0) == pytest.approx(-1.0)
    assert math.isnan(improvement("rouge_l", math.nan, 0.1))


def test_report_table_and_gate_value() -> None:
    spec = EvaluationSpec(primary_metric="field_accuracy", n_report_samples=1)
    rep = build_report(
        spec,
        [REF, REF],
        ["t1", "t2"],
        ["nope", "nope"],
        [REF, "{}"],
        {"perplexity": 9.0, "eos_rate": 0.0},
        {"perplexity": 3.0, "eos_rate": 1.0},
    )
    assert rep.tuned["field_accuracy"] == 0.5 and rep.base["field_accuracy"] == 0.0
    assert rep.primary_improvement == 0.5
    assert rep.delta["perplexity"] == 6.0
    md = render_markdown(rep, "t")
    assert "| field_accuracy | 0.0000 | 0.5000 | 0.5000 |" in md and "| t1 |" in md and "t2" not in md
