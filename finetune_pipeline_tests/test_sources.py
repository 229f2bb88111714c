"""Several sources mixed on purpose: each with its own folder, format and column map; the training mix (weight,
max_rows) happens after dedup and after the splits are fixed, so oversampling never copies a validation or test
row into training, and the leak check runs on the mixed training set."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.drops import drop_key
from finetune_pipeline.data.split import build_splits, mix_train, overlap_report
from finetune_pipeline.layout import PipelineLayout, RawDropRecord
from finetune_pipeline.spec import DedupSpec, PipelineSpec, SplitSpec, parse_spec
from finetune_pipeline.stages.ingest import ingest_drop, scan_sources, store_raw
from finetune_pipeline.stages.splits import build_dataset_splits
from finetune_pipeline_tests.conftest import chat_row, write_jsonl

pytestmark = pytest.mark.unit

REG = {"model_name": "m"}


def _sources(a: dict | None = None, b: dict | None = None) -> list[dict]:
    return [
        {"name": "tickets", "incoming_dir": "a", "settle_seconds": 0, **(a or {})},
        {
            "name": "faq",
            "incoming_dir": "b",
            "settle_seconds": 0,
            "file_glob": "*.csv",
            "record_format": "prompt_completion",
            "columns": {"prompt": "question", "completion": "reply", "id": "qid"},
            **(b or {}),
        },
    ]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"source": {"incoming_dir": "a"}, "sources": _sources()}, "not both"),
        ({}, "source: required field is missing"),
        ({"sources": [{"name": "x", "incoming_dir": "a"}, {"name": "x", "incoming_dir": "b"}]}, "must be unique"),
        ({"sources": _sources(b={"weight": 0})}, "weight: must be > 0"),
        ({"sources": _sources(), "split": {"method": "stratified"}}, "sources[tickets].columns.label"),
    ],
)
def test_source_rules(raw: dict, message: str) -> None:
    import yaml

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(yaml.safe_dump({"name": "t", "registry": REG, **raw}))


def test_single_source_spec_still_works() -> None:
    spec = PipelineSpec.model_validate({"name": "t", "source": {"incoming_dir": "in"}, "registry": REG})
    assert [s.name for s in spec.source_list()] == ["default"]
    assert PipelineSpec.model_validate(spec.model_dump(mode="json")) == spec  # round trip (with_overrides)


def _rows(source: str, n: int, start: int = 0) -> pd.DataFrame:
    ids = [f"{source}{i}" for i in range(start, start + n)]
    return pd.DataFrame(
        {
            "row_id": ids,
            "messages": [
                json.dumps([{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": i}]) for i in ids
            ],
            "content_hash": ids,
            "drop": f"d_{source}",
            "source_line": range(start + 1, start + n + 1),
            "source": source,
            "label": None,
            "timestamp": None,
        }
    )


SPLIT = SplitSpec(validation_fraction=0.2, test_fraction=0.2, salt="mix")


@pytest.mark.parametrize(
    ("weight", "cap", "expected"),
    [(1.0, None, 1.0), (3.0, None, 3.0), (0.5, None, 0.5), (2.5, None, 2.5), (3.0, 10, None)],
)
def test_mix_rules(weight: float, cap: int | None, expected: float | None) -> None:
    rows = pd.concat([_rows("a", 200), _rows("b", 200)], ignore_index=True)
    split = np.array(["train"] * 120 + ["test"] * 80 + ["train"] * 120 + ["validation"] * 80, dtype=object)
    chosen, table = mix_train(rows, split, {"a": (1.0, None), "b": (weight, cap)}, "s")
    assert set(split[chosen]) == {"train"}  # never a validation or test row
    b = chosen[chosen >= 200]
    assert len(b) == (10 if cap else int(120 * expected + 0.5))
    assert (chosen < 200).sum() == 120
    assert table.set_index("source").loc["b", "mixed_rows"] == len(b)
    again, _ = mix_train(rows, split, {"a": (1.0, None), "b": (weight, cap)}, "s")
    assert np.array_equal(chosen, again)  # a pure function of (salt, row id)


def test_oversampling_never_copies_validation_or_test_rows_into_training() -> None:
    """The rival tool's bug: oversampling before the split put copies of a row into train and test alike."""
    cleaned = [_rows("a", 300), _rows("b", 100)]
    plain = build_splits(cleaned, SPLIT, ["d_a", "d_b"], DedupSpec())
    mixed = build_splits(cleaned, SPLIT, ["d_a", "d_b"], DedupSpec(), mix={"a": (1.0, None), "b": (4.0, None)})
    for s in ("validation", "test"):  # the weights leave validation and test exactly as they were
        pd.testing.assert_frame_equal(plain.frames[s], mixed.frames[s])
    train = mixed.frames["train"]
    held_out = set(mixed.frames["validation"]["content_hash"]) | set(mixed.frames["test"]["content_hash"])
    assert not held_out & set(train["content_hash"])
    report = overlap_report(mixed.frames)
    assert report["train_test_content_overlap"] == report["train_validation_content_overlap"] == 0
    n_b = int((plain.frames["train"]["source"] == "b").sum())
    assert (train["source"] == "b").sum() == 4 * n_b
    assert (train["source"] == "a").sum() == (plain.frames["train"]["source"] == "a").sum()
    assert mixed.train_pool == len(plain.frames["train"])


def _near_pairs(source: str, n: int) -> pd.DataFrame:
    """n pairs of rows that differ in one trailing word (near-duplicates on both sides)."""
    words = "the export to the shared drive fails every night with a timeout after the sync of large folders"
    rows = []
    for i in range(n):
        for v in ("one", "two"):
            rid = f"{source}{i}{v}"
            q = f"case {i} alpha{i} beta{i} gamma{i}: {words} {v}"
            a = f"answer {i} delta{i} epsilon{i}: restart the agent, then run the sync again for {words} {v}"
            msgs = json.dumps([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            rows.append(
                {
                    "row_id": rid,
                    "messages": msgs,
                    "content_hash": rid,
                    "drop": "d",
                    "source": source,
                    "source_line": 2 * i,
                }
            )
    return pd.DataFrame(rows).assign(label=None, timestamp=None)


def test_leak_check_runs_on_the_mixed_training_set() -> None:
    rows = _near_pairs("b", 40)
    spec = SplitSpec(validation_fraction=0.0, test_fraction=0.3, salt="leak")
    dd = DedupSpec(near=False, boilerplate_share=1.0)  # keep the near pairs so that leaks exist
    full = build_splits([rows], spec, ["d"], dd, mix={"b": (3.0, None)})
    capped = build_splits([rows], spec, ["d"], dd, mix={"b": (1.0, 5)})
    assert len(full.leaks) > 0  # test rows whose near twin is in training (three times over)
    assert set(full.leaks["train_row_id"]) <= set(full.frames["train"]["row_id"])
    in_mix = set(capped.frames["train"]["row_id"])
    assert len(in_mix) == 5 and set(capped.leaks["train_row_id"]) <= in_mix  # only rows training will see
    assert len(capped.leaks) < len(full.leaks)


def test_drops_remember_their_source_and_use_its_format(tmp_path: Path) -> None:
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(
        json.dumps({"name": "mixp", "sources": _sources(b={"weight": 2.0}), "registry": REG, "dedup": {"near": False}})
    )
    from finetune_pipeline.spec import load_spec

    spec = load_spec(spec_path)
    write_jsonl(tmp_path / "a" / "t.jsonl", [chat_row(i, answer=f"answer {i} to the ticket") for i in range(60)])
    (tmp_path / "b").mkdir()
    pd.DataFrame(
        {
            "qid": [f"f{i}" for i in range(30)],
            "question": [f"faq question {i}?" for i in range(30)],
            "reply": [f"faq reply number {i}." for i in range(30)],
        }
    ).to_csv(tmp_path / "b" / "f.csv", index=False)
    scan = scan_sources(spec, None, set())  # type: ignore[arg-type]
    assert sorted(d.path.name for d in scan.ready) == ["f.csv", "t.jsonl"]
    layout = PipelineLayout(tmp_path / "state", "mixp")
    drops = []
    for d in scan.ready:
        rec = store_raw(layout, spec, d.key, None)  # found by content hash in its own source's folder
        assert rec.source == ("faq" if d.path.suffix == ".csv" else "tickets")
        assert RawDropRecord.load(layout.raw_record(d.key)).source == rec.source
        assert ingest_drop(layout, spec, d.key, log=lambda _: None).used_for_training
        drops.append(d.key)
    kept = {d: pd.read_parquet(layout.kept(d)) for d in drops}
    faq = kept[drop_key(tmp_path / "b" / "f.csv")]
    assert set(faq["source"]) == {"faq"} and faq["row_id"].iloc[0] == "f0"  # its own column map
    rec = build_dataset_splits(layout, spec, drops, log=lambda _: None)
    mix = rec.result.mix.set_index("source")
    assert mix.loc["faq", "mixed_rows"] == 2 * mix.loc["faq", "train_rows"]
    assert rec.accounted and rec.no_test_leak and rec.exact_overlap == 0
    train = pd.read_parquet(layout.split("train"))
    assert (train["source"] == "faq").sum() == 2 * mix.loc["faq", "train_rows"]


def test_clean_file_uses_the_given_source(tmp_path: Path) -> None:
    spec = PipelineSpec.model_validate({"name": "t", "sources": _sources(), "registry": REG})
    f = tmp_path / "f.csv"
    pd.DataFrame({"qid": ["x"], "question": ["why?"], "reply": ["because."]}).to_csv(f, index=False)
    res = clean_file(f, "d", spec, source=spec.source_named("faq"))
    assert (res.kept["row_id"].tolist(), res.kept["source"].tolist()) == (["x"], ["faq"])
