"""Tier 1: evaluation metrics and the promotion direction."""

import math

import pytest

from finetune_pipeline.evaluation.generate import ModelOutputs
from finetune_pipeline.evaluation.metrics import (
    METRICS,
    exact_match,
    field_accuracy,
    improvement,
    json_valid,
    label_table,
    rouge_l,
    row_scores,
    score,
)
from finetune_pipeline.evaluation.report import ModelScores, build_report, render_markdown, score_outputs
from finetune_pipeline.spec import EvaluationSpec

pytestmark = pytest.mark.unit

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


def _scores(preds: list[str], nll: list[float]) -> ModelScores:
    spec = EvaluationSpec(primary_metric="field_accuracy")
    return score_outputs(
        ModelOutputs(
            predictions=preds, eos_reached=[True] * len(preds), row_nll=nll, row_tokens=[1] * len(preds), seconds=0
        ),
        [REF] * len(preds),
        spec,
    )


def test_report_table_and_gate_value() -> None:
    spec = EvaluationSpec(primary_metric="field_accuracy", n_report_samples=1)
    scores = {"base": _scores(["nope", "nope"], [3.0, 3.0]), "tuned": _scores([REF, "{}"], [1.0, 1.0])}
    rep = build_report(spec, [REF, REF], ["t1", "t2"], scores, 0.95)
    assert rep.tuned["field_accuracy"] == 0.5 and rep.base["field_accuracy"] == 0.0
    assert rep.primary_improvement == 0.5 and rep.vs_base["field_accuracy"].delta == 0.5
    assert rep.delta["perplexity"] == pytest.approx(math.exp(3) - math.exp(1))
    md = render_markdown(rep, "t")
    assert "| field_accuracy | 0.0000 | 0.5000 | +0.5000 [+0.0000, +1.0000] |" in md
    assert rep.regressions_vs_base == []  # tuned never loses to base here


@pytest.mark.parametrize(
    ("metric", "pred", "ref", "want"),
    [
        ("token_f1", "the cat sat", "the cat sat", 1.0),
        ("token_f1", "a b c", "a b d", 2 / 3),
        ("bleu", "the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("chrf", "abc", "xyz", 0.0),
        ("rouge_1", "the cat", "the cat", 1.0),
        ("rouge_2", "the cat sat", "the dog sat", 0.0),
        ("exact_match", "x", "y", 0.0),
    ],
)
def test_text_metric_table(metric: str, pred: str, ref: str, want: float) -> None:
    assert METRICS[metric].per_row(pred, ref) == pytest.approx(want, abs=1e-6)  # type: ignore[misc]


def test_json_schema_labels_and_custom_metric() -> None:
    schema = {"type": "object", "required": ["category"], "properties": {"category": {"enum": ["billing", "tech"]}}}
    spec = EvaluationSpec(
        metrics=["json_schema", "upper", "exact_match"],
        primary_metric="upper",
        json_schema=schema,
        custom_metrics={"upper": {"function": "finetune_pipeline_tests.test_metrics:_upper"}},
    )
    rows = row_scores(['{"category": "billing"}', '{"category": "other"}', "x"], [REF, REF, "X"], spec)
    assert rows == {"json_schema": [1.0, 0.0, 0.0], "upper": [0.0, 0.0, 1.0], "exact_match": [0.0, 0.0, 0.0]}
    tab = label_table(['{"category": "billing"}', "nope"], [REF, REF], "category")
    assert tab["per_label"]["billing"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert tab["confusion"]["billing"]["<missing>"] == 1
    with pytest.raises(ValueError, match="module:function"):
        EvaluationSpec(custom_metrics={"x": {"function": "no_colon"}})
    with pytest.raises(ValueError, match="json_schema needs"):
        EvaluationSpec(metrics=["json_schema"], primary_metric="json_schema")


def _upper(pred: str, ref: str) -> float:
    return float(pred.upper() == ref)
