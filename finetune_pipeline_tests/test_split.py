"""Tier 1: near-duplicates (within and across drops), test/train leaks, split methods, quality, drift, tokens."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_pipeline.data import dedup, quality
from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.drift import drift
from finetune_pipeline.data.split import SPLITS, build_splits, overlap_report
from finetune_pipeline.spec import DedupSpec, QualitySpec, SplitSpec
from finetune_pipeline_tests.conftest import make_spec, write_jsonl

pytestmark = pytest.mark.unit

WORDS = [f"w{i}" for i in range(2000)]


def _sentence(rng: np.random.Generator, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS, n)) + "."


def _row(rid: str, q: str, a: str, **extra: object) -> dict:
    return {"id": rid, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], **extra}


def test_shingles_and_exact_jaccard() -> None:
    sh = dedup.shingle(["The cat sat on the mat.", "the CAT sat on the mat", "dog", ""], 3)
    assert list(sh.sizes) == [4, 4, 1, 0]
    assert dedup.jaccard(sh.row(0), sh.row(1)) == 1.0  # case and punctuation do not matter
    assert dedup.jaccard(sh.row(0), sh.row(2)) == 0.0


def test_pair_jaccard_equals_jaccard_pair_by_pair() -> None:
    """The vectorised verification against the one-pair definition, repeated shingles and empty entries included."""
    rng = np.random.default_rng(1)
    texts = [" ".join(rng.choice(WORDS[:30], int(rng.integers(0, 12)))) for _ in range(200)]
    texts += ["a b c a b c a b c", "a b c", ""]
    sh = dedup.shingle(texts, 3)
    left, right = rng.integers(0, len(texts), 500), rng.integers(0, len(texts), 500)
    left[:3], right[:3] = [200, 202, 202], [201, 202, 0]
    want = [dedup.jaccard(sh.row(a), sh.row(b)) for a, b in zip(left, right, strict=True)]
    assert dedup.pair_jaccard(sh, left, right).tolist() == pytest.approx(want)
    assert want[:2] == pytest.approx([1 / 3, 1.0]) and len(dedup.pair_jaccard(sh, left[:0], right[:0])) == 0


def test_near_duplicates_within_a_drop_record_the_matched_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [_row(f"r{i}", _sentence(rng), _sentence(rng)) for i in range(300)]
    # plant near-duplicates: one word changed at the end of the answer
    for j, src in enumerate((3, 50, 120)):
        q, a = rows[src]["messages"][0]["content"], rows[src]["messages"][1]["content"]
        rows.append(_row(f"near{j}", q, a[:-1] + " extra."))
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    res = clean_file(f, "d", make_spec())
    near = res.duplicates[res.duplicates["kind"] == "near"]
    assert sorted(zip(near["row_id"], near["duplicate_of"], strict=True)) == [
        ("near0", "r3"),
        ("near1", "r50"),
        ("near2", "r120"),
    ]
    assert (near["similarity"] >= 0.8).all() and (near["similarity"] < 1).all()
    assert res.accounted() and len(res.kept) == 300
    off = clean_file(f, "d", make_spec(dedup={"near": False}))
    assert len(off.kept) == 303


def test_near_duplicates_across_drops_and_the_test_leak_gate() -> None:
    rng = np.random.default_rng(1)
    base = [(_sentence(rng), _sentence(rng)) for _ in range(400)]

    def frame(pairs: list, drop: str, prefix: str) -> pd.DataFrame:
        msgs = [json.dumps(_row("x", q, a)["messages"]) for q, a in pairs]
        return pd.DataFrame(
            {
                "row_id": [f"{prefix}{i}" for i in range(len(pairs))],
                "messages": msgs,
                "content_hash": [f"{prefix}h{i}" for i in range(len(pairs))],
                "prompt_hash": [f"{prefix}p{i}" for i in range(len(pairs))],
                "drop": drop,
                "source_line": range(1, len(pairs) + 1),
            }
        )

    later = [(q, a[:-1] + " again.") for q, a in base[:40]]  # near copies of 40 first-drop rows
    frames = [frame(base, "a", "a"), frame(later, "b", "b")]
    res = build_splits(frames, SplitSpec(), ["a", "b"], DedupSpec())
    near = res.cross_drop_duplicates[res.cross_drop_duplicates["kind"] == "near"]
    assert len(near) == 40 and set(near["drop"]) == {"b"}
    assert sorted(near["duplicate_of"]) == sorted(f"a{i}" for i in range(40))
    assert res.leaks.empty
    # with near dedup off the copies stay, and the gate finds those that landed in test next to a train twin
    off = build_splits(frames, SplitSpec(), ["a", "b"], DedupSpec(near=False))
    split_of = {r: s for s in SPLITS for r in off.frames[s]["row_id"]}
    expected = {
        (f"b{i}", f"a{i}") for i in range(40) if split_of[f"b{i}"] == "test" and split_of[f"a{i}"] == "train"
    } | {(f"a{i}", f"b{i}") for i in range(40) if split_of[f"a{i}"] == "test" and split_of[f"b{i}"] == "train"}
    assert set(zip(off.leaks["test_row_id"], off.leaks["train_row_id"], strict=True)) == expected
    assert len(expected) > 0


def _frames(n: int, drop: str, start: int = 0, labels: list[str] | None = None, t0: int = 0) -> pd.DataFrame:
    ids = [f"r{i}" for i in range(start, start + n)]
    return pd.DataFrame(
        {
            "row_id": ids,
            "messages": [
                json.dumps([{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]) for i in ids
            ],
            "content_hash": [f"h{i}" for i in ids],
            "prompt_hash": [f"p{i}" for i in ids],
            "drop": drop,
            "source_line": range(1, n + 1),
            "label": [labels[i % len(labels)] for i in range(n)] if labels else None,
            "timestamp": [pd.Timestamp(t0 + i, unit="h", tz="UTC").isoformat() for i in range(n)],
        }
    )


def test_stratified_split_keeps_each_label_fraction_and_never_moves_rows() -> None:
    spec = SplitSpec(method="stratified", validation_fraction=0.1, test_fraction=0.2)
    labels = ["a"] * 8 + ["b"] * 2  # 80% a, 20% b
    first = build_splits([_frames(500, "d1", labels=labels)], spec, ["d1"])
    for lab, n in (("a", 400), ("b", 100)):
        test = first.frames["test"]
        assert (test["label"] == lab).sum() == round(0.2 * n)
        assert (first.frames["validation"]["label"] == lab).sum() == round(0.1 * n)
    second = build_splits(
        [_frames(500, "d1", labels=labels), _frames(300, "d2", 500, labels=["b"])], spec, ["d1", "d2"]
    )
    for s in SPLITS:
        assert set(first.frames[s]["row_id"]) <= set(second.frames[s]["row_id"])
    assert (second.frames["test"]["label"] == "b").sum() == round(0.2 * 400)


def test_temporal_split_puts_the_newest_rows_of_each_drop_in_test() -> None:
    spec = SplitSpec(method="temporal", validation_fraction=0.1, test_fraction=0.2)
    res = build_splits([_frames(100, "d1")], spec, ["d1"])
    ts = {s: pd.to_datetime(res.frames[s]["timestamp"]) for s in SPLITS}
    assert len(ts["test"]) == 20 and len(ts["validation"]) == 10
    assert ts["train"].max() < ts["validation"].min() and ts["validation"].max() < ts["test"].min()
    later = build_splits([_frames(100, "d1"), _frames(50, "d2", 100, t0=1000)], spec, ["d1", "d2"])
    for s in SPLITS:
        assert set(res.frames[s]["row_id"]) <= set(later.frames[s]["row_id"])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    method=st.sampled_from(["random", "stratified", "temporal"]),
    val=st.floats(0, 0.4),
    test=st.floats(0.01, 0.4),
)
def test_every_method_is_disjoint_loses_nothing_and_is_stable(
    sizes: list[int], method: str, val: float, test: float
) -> None:
    spec = SplitSpec(method=method, validation_fraction=val, test_fraction=test)
    frames, start = [], 0
    for k, n in enumerate(sizes):
        frames.append(_frames(n, f"d{k}", start, labels=["x", "y", "z"]))
        start += n
    drops = [f"d{k}" for k in range(len(sizes))]
    res = build_splits(frames, spec, drops)
    assert sum(len(f) for f in res.frames.values()) == start
    assert all(v == 0 for v in overlap_report(res.frames).values())
    prev = build_splits(frames[:-1], spec, drops[:-1]) if len(frames) > 1 else None
    if prev is not None:
        for s in SPLITS:
            assert set(prev.frames[s]["row_id"]) <= set(res.frames[s]["row_id"])


def test_stratified_and_temporal_need_their_columns(tmp_path: Path) -> None:
    rows = [_row("a", "q one?", "yes.", cat="x", ts="2026-01-01T00:00:00Z"), _row("b", "q two?", "no.", ts="yesterday")]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    strat = make_spec(source={"columns": {"label": "cat"}}, split={"method": "stratified"})
    assert clean_file(f, "d", strat).quarantine["reason"].tolist() == ["missing_label"]
    temporal = make_spec(source={"columns": {"timestamp": "ts"}}, split={"method": "temporal"})
    res = clean_file(f, "d", temporal)
    assert res.quarantine["reason"].tolist() == ["bad_timestamp"]
    assert res.kept["timestamp"].tolist() == ["2026-01-01T00:00:00.000000Z"]
    with pytest.raises(ValueError, match="columns.label"):
        make_spec(split={"method": "stratified"})


def test_quality_score_flags_what_the_guides_name(tmp_path: Path) -> None:
    answers = [
        "Paris is the capital of France.",
        "I cannot help with that request, sorry about it.",
        '{"category": "billing", "priority":',
        "the same words again the same words again the same words again the same words again the same words",
        "This answer just stops in the middle of the",
    ]
    q = quality.score(pa.array(answers), QualitySpec())
    assert q.score[0] == 1.0
    assert q.signals["marker"][1] and q.score[1] < 0.5
    assert q.signals["invalid_json"][2] and q.score[2] < 0.5
    assert q.signals["repetition"][3] > 0.5 and q.score[3] < 0.5
    assert q.signals["truncated"][4] and q.score[4] == pytest.approx(0.7)
    f = write_jsonl(tmp_path / "q.jsonl", [_row(f"r{i}", f"question {i}?", a) for i, a in enumerate(answers)])
    res = clean_file(f, "d", make_spec(cleaning={"max_rejection_rate": 1}))
    assert sorted(res.quarantine["source_line"]) == [2, 3, 4]
    assert set(res.quarantine["reason"]) == {"low_quality"}
    assert "marker" in res.quarantine.set_index("source_line").loc[2, "detail"]


def test_drift_score_rises_when_the_data_changes() -> None:
    rng = np.random.default_rng(3)

    def frame(words: list[str], n: int, length: int) -> pd.DataFrame:
        msgs = [json.dumps(_row("x", " ".join(rng.choice(words, length)), "ok.")["messages"]) for _ in range(n)]
        return pd.DataFrame(
            {"messages": msgs, "chars": [len(m) for m in msgs], "n_messages": 2, "content_hash": range(n), "label": "a"}
        )

    ref = frame(WORDS[:500], 400, 20)
    same = drift(frame(WORDS[:500], 200, 20), ref)
    other = drift(frame(WORDS[1000:1500], 200, 60), ref)
    assert same.score < 0.25 < other.score
    assert other.components["vocabulary"] > 0.9 and other.components["length"] > 0.9


def test_token_counts_follow_the_chat_template(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from finetune_pipeline.data.tokens import TokenCounter, length_stats

    counter = TokenCounter(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    msgs = [
        [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi! " * k}] for k in (1, 5, 40)
    ]
    expected = [len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]) for m in msgs]
    got = counter([json.dumps(m) for m in msgs])
    assert got.tolist() == expected
    stats = length_stats(got, max_length=expected[1])
    assert stats["over_max_length"] == 1 and stats["max"] == expected[2]
