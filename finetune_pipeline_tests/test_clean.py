"""Tier 1: cleaning, quarantine, dedup and split rules on real files in tmp dirs."""

import json
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.demo_tickets import write_demo_drops
from finetune_pipeline.data.clean import clean_file, frame_digest
from finetune_pipeline.data.split import build_splits, overlap_report, split_of
from finetune_pipeline.keys import training_fingerprint
from finetune_pipeline.spec import SplitSpec
from finetune_pipeline_tests.conftest import chat_row, make_spec, write_jsonl

pytestmark = pytest.mark.unit

SPEC = make_spec()


def test_every_fault_is_quarantined_with_reason_and_line(tmp_path: Path) -> None:
    good = chat_row(1)
    rows = [
        good,
        '{"id": "cut", "messages": [{"role": "user"',  # line 2: truncated JSON
        {"id": "x", "prompt": "p", "completion": "c"},  # 3: another record format
        {"id": "e", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},  # 4
        {"id": "n", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},  # 5
        {"id": "u", "messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},  # 6
        {"id": "r", "messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},  # 7
        "[1, 2]",  # 8: not an object
        good,  # 9: exact duplicate of line 1
        "",  # 10: blank
        {"id": "s", "messages": "hello"},  # 11
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    with f.open("ab") as fh:
        fh.write(b'{"id": "bin", "messages": "\xff\xfe"}\n')  # 12: not UTF-8
    res = clean_file(f, "drop1", SPEC)
    by_line = dict(zip(res.quarantine["source_line"], res.quarantine["reason"], strict=True))
    assert by_line == {
        2: "invalid_json",
        3: "mixed_format",
        4: "empty_assistant",
        5: "null_content",
        6: "no_final_assistant",
        7: "unknown_role",
        8: "not_an_object",
        11: "messages_not_list",
        12: "invalid_utf8",
    }
    assert list(res.kept["row_id"]) == ["r1"]
    assert res.duplicates.iloc[0].to_dict() == {
        "drop": "drop1",
        "source_line": 9,
        "row_id": "r1",
        "duplicate_of": "r1",
        "content_hash": res.kept["content_hash"][0],
        "kind": "exact",
        "similarity": 1.0,
    }
    assert res.blank_lines == 1 and res.rows_in == 11 and res.accounted()
    assert "robot" in res.quarantine.set_index("source_line").loc[7, "detail"]


def test_bom_whitespace_and_missing_id(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "  hello \t  world  "}, {"role": "assistant", "content": "ok  "}]}
    f = tmp_path / "b.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(row).encode() + b"\n")
    res = clean_file(f, "d", SPEC)
    msgs = json.loads(res.kept["messages"][0])
    assert msgs[0]["content"] == "hello world" and msgs[1]["content"] == "ok"
    assert res.kept["row_id"][0] == res.kept["content_hash"][0][:16]


def test_length_rule(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "l.jsonl", [chat_row(1, answer="x" * 500)])
    res = clean_file(f, "d", make_spec(cleaning={"max_total_chars": 100}))
    assert list(res.quarantine["reason"]) == ["too_long"]


def test_demo_drops_clean_within_limits(tmp_path: Path) -> None:
    paths = write_demo_drops(tmp_path)
    total_kept = 0
    for p in paths:
        res = clean_file(p, p.stem, make_spec(cleaning={"max_rejection_rate": 0.02}))
        assert res.accounted()
        assert 0 < res.rejection_rate <= 0.02
        assert len(res.duplicates) > 0
        total_kept += len(res.kept)
    assert total_kept >= 2000


def _frame(ids: list[str], drop: str) -> pd.DataFrame:
    rows = []
    for i in ids:
        m = json.dumps(chat_row(int(i.strip("r")))["messages"])
        rows.append(
            {
                "row_id": i,
                "messages": m,
                "content_hash": f"h{i}",
                "prompt_hash": f"p{i}",
                "drop": drop,
                "source_line": 1,
            }
        )
    return pd.DataFrame(rows)


def test_split_is_stable_when_drops_are_added() -> None:
    spec = SplitSpec(validation_fraction=0.1, test_fraction=0.2)
    first = build_splits([_frame([f"r{i}" for i in range(300)], "a")], spec)
    second = build_splits(
        [_frame([f"r{i}" for i in range(300)], "a"), _frame([f"r{i}" for i in range(300, 600)], "b")], spec
    )
    for s in ("train", "validation", "test"):
        old = set(first.frames[s]["row_id"])
        assert old <= set(second.frames[s]["row_id"]), f"a later drop moved rows out of {s}"
    assert 40 < len(first.frames["test"]) < 80  # ~20% of 300


def test_cross_drop_duplicates_keep_the_first_drop() -> None:
    a, b = _frame(["r1", "r2"], "a"), _frame(["r2", "r3"], "b")
    res = build_splits([a, b], SplitSpec())
    kept = pd.concat(res.frames.values())
    assert sorted(kept["row_id"]) == ["r1", "r2", "r3"]
    assert kept.set_index("row_id").loc["r2", "drop"] == "a"
    assert res.cross_drop_duplicates[["drop", "row_id", "duplicate_of"]].values.tolist() == [["b", "r2", "r2"]]


def test_same_id_with_other_content_in_a_later_drop_gets_a_distinct_id() -> None:
    a = _frame(["r1"], "a")
    b = _frame(["r2"], "b").assign(row_id="r1")  # another drop reuses id r1 for different content
    res = build_splits([a, b], SplitSpec())
    ids = sorted(pd.concat(res.frames.values())["row_id"])
    assert ids == ["r1", "r1@b"]
    assert all(v == 0 for k, v in overlap_report(res.frames).items() if k.endswith("_id_overlap"))


def test_digest_is_order_independent_and_content_sensitive() -> None:
    f = _frame(["r1", "r2", "r3"], "a")
    assert frame_digest(f, ["row_id", "content_hash"]) == frame_digest(f.iloc[::-1], ["row_id", "content_hash"])
    g = f.copy()
    g.loc[0, "content_hash"] = "changed"
    assert frame_digest(f, ["row_id", "content_hash"]) != frame_digest(g, ["row_id", "content_hash"])
    assert (
        training_fingerprint(["a", "b"], "s")
        == training_fingerprint(["b", "a"], "s")
        != training_fingerprint(["a"], "s")
    )


@settings(max_examples=50, deadline=None)
@given(ids=st.sets(st.integers(0, 10_000), min_size=1, max_size=200), val=st.floats(0, 0.4), test=st.floats(0.01, 0.4))
def test_splits_are_disjoint_and_lose_nothing(ids: set[int], val: float, test: float) -> None:
    spec = SplitSpec(validation_fraction=val, test_fraction=test)
    res = build_splits([_frame([f"r{i}" for i in ids], "a")], spec)
    sizes = [len(res.frames[s]) for s in ("train", "validation", "test")]
    assert sum(sizes) == len(ids)
    rep = overlap_report(res.frames)
    assert all(v == 0 for v in rep.values())
    for s, frame in res.frames.items():
        assert all(split_of(r, spec) == s for r in frame["row_id"])
