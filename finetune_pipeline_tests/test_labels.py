"""Tier 1: label normalisation (source.labels) applied while cleaning, before the stratified split and the label
checks; one case per rule."""

from pathlib import Path

import pandas as pd
import pytest

from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.labels import normalise_labels
from finetune_pipeline.data.split import build_splits
from finetune_pipeline.spec import LabelSpec, PipelineSpec
from finetune_pipeline_tests.conftest import chat_row, make_spec, write_jsonl

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("rule", "raw", "expected"),
    [
        ({}, [" Billing ", "billing"], [" Billing ", "billing"]),  # off by default: untouched
        ({"strip": True}, [" Billing ", "Tech\t"], ["Billing", "Tech"]),
        ({"lowercase": True}, ["Billing", "TECH"], ["billing", "tech"]),
        ({"mapping": {"bill": "billing"}}, ["bill", "other"], ["billing", "other"]),
        ({"strip": True, "lowercase": True, "mapping": {"Bill": "billing"}}, [" BILL "], ["billing"]),
        ({"mapping": {"n/a": ""}}, ["n/a", "x"], [None, "x"]),  # mapped to '' = missing
        ({"strip": True}, [None, "x"], [None, "x"]),  # missing stays missing
    ],
)
def test_label_rules(rule: dict, raw: list, expected: list) -> None:
    out, unknown = normalise_labels(pd.Series(raw, dtype=object), LabelSpec(**rule))
    assert out.tolist() == expected
    assert not unknown.any()


def test_unmapped_quarantine_flags_labels_outside_the_table() -> None:
    spec = LabelSpec(mapping={"bill": "billing"}, unmapped="quarantine")
    out, unknown = normalise_labels(pd.Series(["bill", "billing", "spam", None], dtype=object), spec)
    assert out.tolist() == ["billing", "billing", "spam", None]
    assert unknown.tolist() == [False, False, True, False]


def test_labels_need_a_label_column() -> None:
    with pytest.raises(ValueError, match="needs columns.label"):
        PipelineSpec.model_validate(
            {"name": "t", "source": {"incoming_dir": "in", "labels": {"strip": True}}, "registry": {"model_name": "m"}}
        )


def _labelled(tmp_path: Path, labels: list[str]) -> Path:
    rows = [{**chat_row(i, answer=f"answer number {i} for this ticket"), "label": lab} for i, lab in enumerate(labels)]
    return write_jsonl(tmp_path / "d.jsonl", rows)


def test_cleaning_normalises_before_the_stratified_split(tmp_path: Path) -> None:
    labels = [" Billing", "billing ", "BILLING", "bill", "Tech", "tech ", " TECH", "technical"] * 10
    spec = make_spec(
        source={
            "columns": {"label": "label"},
            "labels": {"strip": True, "lowercase": True, "mapping": {"bill": "billing", "technical": "tech"}},
        },
        split={"method": "stratified", "test_fraction": 0.25, "validation_fraction": 0.25},
        dedup={"near": False},
    )
    res = clean_file(_labelled(tmp_path, labels), "d1", spec)
    assert sorted(res.kept["label"].unique()) == ["billing", "tech"]
    splits = build_splits([res.kept], spec.split, ["d1"])
    for frame in splits.frames.values():  # two classes of 40 rows: each split holds both, evenly
        counts = frame["label"].value_counts()
        assert counts["billing"] == counts["tech"]


def test_unknown_label_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    spec = make_spec(
        source={
            "columns": {"label": "label"},
            "labels": {"lowercase": True, "mapping": {"bill": "billing"}, "unmapped": "quarantine"},
        },
        cleaning={"max_rejection_rate": 1.0},
    )
    res = clean_file(_labelled(tmp_path, ["Bill", "billing", "spam"]), "d1", spec)
    assert res.kept["label"].tolist() == ["billing", "billing"]
    q = res.quarantine.iloc[0]
    assert (q["source_line"], q["reason"]) == (3, "unknown_label")
    assert "'spam'" in q["detail"]
