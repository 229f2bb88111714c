"""Tier 1: data readiness: resolving power of the test split, the guides' minimums, label balance, verdict."""

import math

import pytest

from finetune_pipeline.data.readiness import assess, label_ratio, min_detectable_difference, rows_needed

pytestmark = pytest.mark.unit


def test_min_detectable_difference_matches_the_two_proportion_formula() -> None:
    # one-sided 0.95 (z 1.645) and power 0.8 (z 0.842): 2.486 * sqrt(0.5 / n)
    assert min_detectable_difference(100) == pytest.approx(2.486 * math.sqrt(0.005), rel=1e-3)
    assert min_detectable_difference(400) == pytest.approx(min_detectable_difference(100) / 2)
    assert min_detectable_difference(0) == math.inf
    assert min_detectable_difference(100, confidence=0.99) > min_detectable_difference(100)


@pytest.mark.parametrize("margin", [0.02, 0.05, 0.1, 0.2])
def test_rows_needed_is_the_inverse(margin: float) -> None:
    n = rows_needed(margin)
    assert min_detectable_difference(n) <= margin < min_detectable_difference(n - 1)


def test_rows_needed_rejects_a_zero_margin() -> None:
    with pytest.raises(ValueError, match="margin must be > 0"):
        rows_needed(0)


@pytest.mark.parametrize(
    ("counts", "ratio"), [({}, None), ({"a": 5}, None), ({"a": 50, "b": 5}, 10.0), ({"a": 9, "b": 3, "c": 0}, 3.0)]
)
def test_label_ratio(counts: dict[str, int], ratio: float | None) -> None:
    assert label_ratio(counts) == ratio


@pytest.mark.parametrize(
    ("rows", "verdict"),
    [
        ({"train": 60, "validation": 8, "test": 8}, "few-shot may be enough"),
        ({"train": 300, "validation": 40, "test": 40}, "collect more data"),
        ({"train": 1200, "validation": 150, "test": 40}, "collect more data"),  # test cannot resolve the gate
        ({"train": 1200, "validation": 150, "test": 2000}, "fine-tune"),
    ],
)
def test_verdicts(rows: dict[str, int], verdict: str) -> None:
    r = assess(rows, max_eval_samples=5000, gate_margin=0.05)
    assert r.verdict == verdict and (r.reasons == []) == (verdict == "fine-tune")


def test_the_143_12_28_case_from_the_issue_says_what_is_wrong() -> None:
    r = assess({"train": 143, "validation": 12, "test": 28}, max_eval_samples=64, gate_margin=0.0)
    assert r.verdict == "collect more data" and not r.test_resolves_gate
    assert r.eval_rows == 28 and r.detectable > 0.3 and r.rows_for_margin > 1000
    assert r.confidence == 0.95 and r.confidence_source.startswith("default")
    assert any("28 evaluated test rows" in x for x in r.reasons)


def test_eval_rows_are_capped_by_evaluation_max_samples() -> None:
    r = assess({"train": 5000, "validation": 500, "test": 5000}, max_eval_samples=64, gate_margin=0.05)
    assert r.eval_rows == 64 and not r.test_resolves_gate and "evaluation.max_samples" in r.reasons[-1]


def test_spec_minimums_block_with_what_to_do() -> None:
    r = assess(
        {"train": 90, "validation": 10, "test": 9},
        max_eval_samples=64,
        gate_margin=0.0,
        min_train_rows=100,
        min_test_rows=10,
    )
    assert len(r.blocking) == 2
    assert "split.min_train_rows=100" in r.blocking[0] and "drop more data" in r.blocking[0]
    assert "split.min_test_rows=10" in r.blocking[1] and "split.test_fraction" in r.blocking[1]
    assert assess({"train": 90, "test": 9}, max_eval_samples=64, gate_margin=0.0).blocking == []


def test_token_budget_and_time_from_the_calibration() -> None:
    r = assess(
        {"train": 1000, "test": 200},
        max_eval_samples=64,
        gate_margin=0.0,
        mean_train_tokens=150.0,
        tokens_per_step_rows=8,
        max_steps=60,
        tokens_per_second=200.0,
        label_counts={"a": 900, "b": 50},
    )
    assert r.train_tokens == 150 * 8 * 60 and r.estimated_seconds == pytest.approx(360.0)
    assert not r.labels_balanced and any("unbalanced" in x for x in r.reasons)


def test_a_budget_under_one_epoch_warns_with_the_minutes_one_epoch_takes() -> None:
    """The issue's case: 1,911 rows of ~150 tokens at 290 tokens/s, five minutes: a third of an epoch."""
    r = assess(
        {"train": 1911, "test": 200},
        max_eval_samples=64,
        gate_margin=0.0,
        mean_train_tokens=150.0,
        tokens_per_step_rows=8,
        max_steps=400,
        tokens_per_second=290.0,
        budget_minutes=5.0,
    )
    assert r.epoch_seconds == pytest.approx(1911 * 150 / 290)
    assert r.budget_epochs == pytest.approx(300 / (1911 * 150 / 290)) and not r.budget_covers_an_epoch
    assert r.estimated_seconds == pytest.approx(300.0)  # the budget caps the planned 400 steps
    assert "covers about 0.30 of an epoch" in r.budget_warning and "16.5 minutes here" in r.budget_warning
    assert r.as_dict()["epoch_minutes"] == 16.5
    roomy = assess(
        {"train": 1911},
        max_eval_samples=64,
        gate_margin=0.0,
        mean_train_tokens=150.0,
        tokens_per_step_rows=8,
        max_steps=None,
        tokens_per_second=290.0,
        budget_minutes=30.0,
    )
    assert roomy.budget_covers_an_epoch and roomy.budget_warning is None and roomy.train_tokens is None
