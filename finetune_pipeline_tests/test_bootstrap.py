"""Tier 1: paired bootstrap intervals, the rows-needed estimate, and interval-based promotion decisions."""

import math
import random

import pytest

from finetune_pipeline.evaluation.bootstrap import RowStat, min_detectable_difference, paired_interval, rows_needed
from finetune_pipeline.evaluation.promotion import decide, floor_failures
from finetune_pipeline.evaluation.report import EvalReport

pytestmark = pytest.mark.unit


def _rows(n: int, p: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [float(rng.random() < p) for _ in range(n)]


def test_seeded_and_reproducible() -> None:
    a, b = RowStat(_rows(50, 0.7, 1)), RowStat(_rows(50, 0.5, 2))
    one = paired_interval("exact_match", a, b, True, seed=3)
    assert one == paired_interval("exact_match", a, b, True, seed=3)
    assert one != paired_interval("exact_match", a, b, True, seed=4)
    assert one.low <= one.delta <= one.high and one.n == 50 and one.resamples == 1000


def test_identical_models_give_a_zero_width_interval_at_zero() -> None:
    a = RowStat(_rows(28, 0.6, 1))
    iv = paired_interval("exact_match", a, a, True)
    assert iv.delta == iv.low == iv.high == 0.0 and not iv.resolved and iv.rows_needed is None


def test_pairing_makes_the_interval_narrower_than_unpaired_noise() -> None:
    """Two models that agree on most rows: the paired interval of the difference is far narrower than the
    spread of either score, which is the point of scoring both on the same rows."""
    base = _rows(100, 0.5, 5)
    better = list(base)
    for i in range(0, 100, 10):  # fixes 10 rows it got wrong, or keeps them right
        better[i] = 1.0
    iv = paired_interval("exact_match", RowStat(better), RowStat(base), True)
    single = paired_interval("exact_match", RowStat(base), RowStat([0.0] * 100), True)
    assert iv.high - iv.low < single.high - single.low
    assert iv.low > 0.0


def test_noise_of_28_rows_is_reported_with_rows_needed() -> None:
    """A +0.1 gain on 28 independent rows: the interval straddles 0 and the report says how many rows resolve it."""
    a, b = _rows(28, 0.6, 11), _rows(28, 0.5, 12)
    iv = paired_interval("exact_match", RowStat(a), RowStat(b), True, margin=0.0)
    assert iv.low < 0 < iv.high
    assert iv.rows_needed is not None and iv.rows_needed > 28
    assert "rows" in iv.describe() and min_detectable_difference(iv) > 0.1


def test_rows_needed_scales_with_the_inverse_square_of_the_gap() -> None:
    iv = paired_interval("x", RowStat([1.0, 0.0] * 20), RowStat([0.0, 0.0] * 20), True, margin=0.45)
    want = math.ceil(iv.n * (iv.half_width / abs(iv.delta - 0.45)) ** 2)
    assert rows_needed(iv) == max(iv.n + 1, want) and iv.rows_needed == rows_needed(iv)


def test_lower_is_better_metric_flips_the_sign() -> None:
    tuned = RowStat([10.0, 12.0, 9.0], [10, 10, 10], log=True)
    base = RowStat([20.0, 22.0, 19.0], [10, 10, 10], log=True)
    iv = paired_interval("perplexity", tuned, base, False)
    assert iv.delta == pytest.approx(base.value() - tuned.value()) and iv.low > 0


def test_unpaired_input_is_refused() -> None:
    with pytest.raises(ValueError, match="not paired"):
        paired_interval("x", RowStat([1.0, 0.0]), RowStat([1.0]), True)


def _report(champion: str | None, tuned: list[float], champ: list[float] | None) -> EvalReport:
    t = RowStat(tuned)
    vs_champion = {}
    if champ is not None:
        vs_champion = {"exact_match": paired_interval("exact_match", t, RowStat(champ), True)}
    return EvalReport(
        n_samples=len(tuned),
        primary_metric="exact_match",
        metrics=["exact_match"],
        higher_is_better={"exact_match": True},
        base={"exact_match": 0.0},
        tuned={"exact_match": t.value()},
        champion={"exact_match": RowStat(champ).value()} if champ else None,
        champion_version=champion,
        vs_champion=vs_champion,
    )


GOOD = [1.0] * 40
HALF = [1.0, 0.0] * 20


@pytest.mark.parametrize(
    ("champion_now", "report", "floors", "promote", "reason"),
    [
        (None, _report(None, HALF, None), {}, True, "no champion yet"),
        ("2", _report("1", GOOD, HALF), {}, True, "already the champion"),
        ("1", _report("1", GOOD, HALF), {}, True, "lower bound"),
        ("1", _report("1", HALF, HALF), {}, False, "not above 0.0"),
        ("1", _report("1", HALF, GOOD), {}, False, "champion kept"),
        ("3", _report("1", GOOD, HALF), {}, False, "the champion is now v3"),
        ("1", _report("1", GOOD, HALF), {"exact_match": 1.5}, False, "below floor"),
        (None, _report(None, HALF, None), {"exact_match": 0.9}, False, "below floor"),
    ],
    ids=[
        "no-champion",
        "same-version",
        "clearly-better",
        "same-weights",
        "worse",
        "stale-evidence",
        "floor",
        "floor-first",
    ],
)
def test_promotion_rules(champion_now, report, floors, promote, reason) -> None:  # type: ignore[no-untyped-def]
    version = "2"
    d = decide(version, report, champion_now, 0.0, floors)
    assert d.promote is promote and reason in d.reason


def test_floor_direction() -> None:
    assert floor_failures({"perplexity": 12.0}, {"perplexity": 10.0}, {"perplexity": False}) == [
        "perplexity 12.0000 > floor 10.0"
    ]
    assert floor_failures({"perplexity": 9.0}, {"perplexity": 10.0}, {"perplexity": False}) == []
