"""Tier 1: every record and file format in, every kind of bad input quarantined with its reason and line."""

import csv
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune_pipeline.data import readers
from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.normalize import json_string, normalise_whitespace
from finetune_pipeline.data.readers import chunks
from finetune_pipeline_tests.conftest import make_spec, write_jsonl

pytestmark = pytest.mark.unit

CHAT = {
    "id": "c1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ],
}
SHAREGPT = {
    "id": "s1",
    "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}],
}
ALPACA = {"id": "a1", "instruction": "Translate to French.", "input": "cat", "output": "chat."}
PROMPT_COMPLETION = {"id": "p1", "prompt": "Capital of Peru?", "completion": "Lima."}
TEXT = {"id": "t1", "text": "A plain paragraph of text to continue pre-training on."}


def _msgs(res) -> list:  # type: ignore[no-untyped-def]
    return [json.loads(m) for m in res.kept["messages"]]


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (CHAT, CHAT["messages"]),
        (
            SHAREGPT,
            [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        ),
        (
            ALPACA,
            [{"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat."}],
        ),
        (
            PROMPT_COMPLETION,
            [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}],
        ),
        (TEXT, [{"role": "assistant", "content": TEXT["text"]}]),
    ],
    ids=["chat", "sharegpt", "alpaca", "prompt_completion", "text"],
)
@pytest.mark.parametrize("file_format", ["jsonl", "json", "csv", "parquet"])
def test_every_record_format_in_every_file_format(
    tmp_path: Path, record: dict, expected: list, file_format: str
) -> None:
    rows = [record, {**record, "id": record["id"] + "b"}]
    path = tmp_path / f"drop.{file_format}"
    if file_format == "jsonl":
        write_jsonl(path, rows)
    elif file_format == "json":
        path.write_text(json.dumps(rows, indent=2))
    elif file_format == "csv":
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(record))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    res = clean_file(path, "d", make_spec())  # record_format auto: detected
    assert res.file_format == file_format
    assert res.quarantine.empty, res.quarantine.to_dict("records")
    assert len(res.duplicates) == 1  # same content under another id is an exact duplicate
    assert _msgs(res) == [expected]
    assert res.accounted()
    assert any("detected record format" in n for n in res.notes)


def test_column_mapping(tmp_path: Path) -> None:
    rec = {
        "uid": 7,
        "dialog": [{"speaker": "user", "text": "hi"}, {"speaker": "assistant", "text": "hello."}],
        "cat": "x",
    }
    f = write_jsonl(tmp_path / "m.jsonl", [rec])
    spec = make_spec(
        source={
            "record_format": "chat",
            "columns": {"messages": "dialog", "role": "speaker", "content": "text", "id": "uid", "label": "cat"},
        }
    )
    res = clean_file(f, "d", spec)
    assert res.quarantine.empty
    assert res.kept["row_id"].tolist() == ["7"] and res.kept["label"].tolist() == ["x"]
    assert _msgs(res)[0][1] == {"role": "assistant", "content": "hello."}


def test_undetectable_format_names_the_file_and_the_fix(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "odd.jsonl", [{"q": "a", "a": "b"}] * 3)
    res = clean_file(f, "d", make_spec())
    assert res.rows_in == 1 and res.accounted() is not False
    [row] = res.quarantine.to_dict("records")
    assert row["reason"] == "unknown_format"
    assert "odd.jsonl" in row["detail"] and "source.record_format" in row["detail"] and "q (3)" in row["detail"]
    assert res.rejection_rate == 1.0  # the blocking gate stops this drop


def _chat(rid: str, *turns: tuple[str, object]) -> dict:
    return {"id": rid, "messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = [_chat(f"g{i}", ("user", f"Question {i}?"), ("assistant", "Yes.")) for i in range(5)]
BIG = "word " * 300_000  # a 1.5 MB row
# One case per quarantine reason: the bad line, the reason it must get, and a word its detail must name.
QUARANTINE_RULES = [
    ("invalid_json", '{"id": "cut", "messages": [{"role": "user"', ""),
    ("mixed_format", {"id": "mix", "instruction": "Do it.", "output": "Done."}, "looks like 'alpaca'"),
    ("missing_field", {"id": "miss", "msgs": []}, "messages"),
    ("unknown_role", _chat("role", ("robot", "q"), ("assistant", "a.")), "robot"),
    ("misordered_roles", _chat("order", ("user", "q"), ("system", "s"), ("assistant", "a.")), ""),
    ("misordered_roles", _chat("two", ("user", "q"), ("user", "q2"), ("assistant", "a.")), ""),
    ("empty_assistant", _chat("empty", ("user", "q"), ("assistant", "  "), ("user", "q2"), ("assistant", "a.")), ""),
    ("null_content", _chat("nul", ("user", None), ("assistant", "a.")), ""),
    ("null_field", {"id": "nullmsgs", "messages": None}, ""),
    ("too_long", _chat("big", ("user", "q"), ("assistant", BIG)), ""),
    ("bad_message", _chat("num", ("user", 5), ("assistant", "a.")), ""),
    ("no_user_turn", _chat("nouser", ("system", "s"), ("assistant", "a.")), ""),
    ("not_an_object", "[1]", ""),
    ("invalid_utf8", b'{"id": "bin", "messages": [{"role": "user", "content": "caf\xe9"}]}', ""),
]


@pytest.mark.parametrize(
    ("reason", "bad", "named"), QUARANTINE_RULES, ids=[f"{r[0]}-{i}" for i, r in enumerate(QUARANTINE_RULES)]
)
def test_each_bad_row_is_quarantined_with_its_reason_and_line(
    tmp_path: Path, reason: str, bad: object, named: str
) -> None:
    f = write_jsonl(tmp_path / "drop.jsonl", GOOD[:3])
    with f.open("ab") as fh:  # the bad row on line 4, good rows around it
        fh.write(
            bad if isinstance(bad, bytes) else ((bad if isinstance(bad, str) else json.dumps(bad)) + "\n").encode()
        )
        if isinstance(bad, bytes):
            fh.write(b"\n")
        fh.write("".join(json.dumps(r) + "\n" for r in GOOD[3:]).encode())
    res = clean_file(f, "d", make_spec(cleaning={"max_total_chars": 1_000_000}))
    assert res.quarantine[["source_line", "reason"]].values.tolist() == [[4, reason]]
    assert sorted(res.kept["row_id"]) == [g["id"] for g in GOOD] and res.accounted()
    row = res.quarantine.iloc[0]
    assert named in row["detail"] and len(row["raw"]) <= readers.RAW_PREVIEW_CHARS


def test_blank_lines_are_counted_and_content_parts_are_joined(tmp_path: Path) -> None:
    parts = {
        "id": "parts",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "multi"}, {"type": "text", "text": "part"}]},
            {"role": "assistant", "content": "ok."},
        ],
    }
    f = write_jsonl(tmp_path / "drop.jsonl", [*GOOD[:2], "", parts])
    res = clean_file(f, "d", make_spec())
    assert res.blank_lines == 1 and res.rows_in == 3 and res.quarantine.empty and res.accounted()
    assert json.loads(res.kept.set_index("row_id").loc["parts", "messages"])[0]["content"] == "multipart"


def test_json_array_cut_off_keeps_complete_records(tmp_path: Path) -> None:
    recs = [{"id": f"r{i}", "prompt": f"question number {i}?", "completion": f"answer {i}."} for i in range(5)]
    text = json.dumps(recs, indent=2)
    cut = text[: text.index('"r3"') + 10]  # cut inside the 4th record
    f = tmp_path / "cut.json"
    f.write_text(cut)
    res = clean_file(f, "d", make_spec())
    assert res.kept["row_id"].tolist() == ["r0", "r1", "r2"]
    [q] = res.quarantine.to_dict("records")
    line = cut[: cut.rindex("{")].count("\n") + 1
    assert q["reason"] == "truncated_json" and q["source_line"] == line
    assert f"line {line}" in q["detail"] and "3 complete records" in q["detail"]
    assert res.accounted() and res.rows_in == 4


def test_json_object_holding_the_records_and_bom(tmp_path: Path) -> None:
    f = tmp_path / "o.json"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"version": 2, "data": [ALPACA]}).encode())
    res = clean_file(f, "d", make_spec())
    assert res.quarantine.empty and res.kept["row_id"].tolist() == ["a1"]
    assert any("data" in n for n in res.notes)


def test_csv_with_a_broken_row_and_multiline_fields(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text('id,prompt,completion\n1,"two\nlines",ok.\n2,only two fields\n3,p,c.\n')
    res = clean_file(f, "d", make_spec())
    assert res.kept["row_id"].tolist() == ["1", "3"]
    assert res.kept["source_line"].tolist() == [2, 5]
    assert res.quarantine[["source_line", "reason"]].values.tolist() == [[4, "bad_csv_row"]]
    assert res.accounted()


def test_unreadable_parquet_is_a_file_level_quarantine(tmp_path: Path) -> None:
    f = tmp_path / "x.parquet"
    f.write_bytes(b"not parquet")
    res = clean_file(f, "d", make_spec())
    assert res.quarantine["reason"].tolist() == ["unreadable_file"] and "x.parquet" in res.quarantine["detail"][0]


def test_whitespace_and_json_escaping_match_python() -> None:
    vals = ['a"b\\c\nd\te', "ctl\x01x\x1f", "ünï “q”", "", "  many   spaces \r\n next\t\tline  "]
    assert json_string(pa.array(vals)).to_pylist() == [json.dumps(v, ensure_ascii=False) for v in vals]
    out = normalise_whitespace(pa.array(vals)).to_pylist()
    assert out[-1] == "many spaces\nnext line"


row_st = st.one_of(
    st.fixed_dictionaries(
        {
            "id": st.text(min_size=0, max_size=5),
            "messages": st.lists(
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(["system", "user", "assistant", "bot", "User"]),
                        "content": st.one_of(st.none(), st.text(max_size=20), st.integers()),
                    }
                ),
                max_size=4,
            ),
        }
    ),
    st.dictionaries(st.sampled_from(["id", "prompt", "completion", "x"]), st.text(max_size=10), max_size=3),
    st.text(max_size=30).map(lambda s: "RAW" + s),
    st.binary(max_size=20).map(lambda b: b"\xff" + b),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(row_st, min_size=1, max_size=40))
def test_nothing_is_lost_and_the_fast_path_agrees_with_the_line_by_line_path(tmp_path_factory, rows) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("h")
    lines = []
    for r in rows:
        if isinstance(r, bytes):
            lines.append(r.replace(b"\n", b" "))
        elif isinstance(r, str):
            lines.append(r.replace("\n", " ").encode())
        else:
            lines.append(json.dumps(r).encode())
    f = d / "h.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    spec = make_spec(source={"record_format": "chat"}, dedup={"near": False}, cleaning={"quality": {"enabled": False}})
    res = clean_file(f, "d", spec)
    assert res.accounted()
    assert res.rows_in + res.blank_lines == len(lines)
    # the same rows through the per-line path only
    old = chunks.CHUNK_LINES
    try:
        chunks.CHUNK_LINES = 1 << 30
        orig = chunks.pajson.read_json
        chunks.pajson.read_json = lambda *a, **k: (_ for _ in ()).throw(pa.ArrowInvalid("forced"))
        slow = clean_file(f, "d", spec)
    finally:
        chunks.CHUNK_LINES = old
        chunks.pajson.read_json = orig
    pd.testing.assert_frame_equal(res.kept, slow.kept)
    assert (
        res.quarantine[["source_line", "reason"]].values.tolist()
        == slow.quarantine[["source_line", "reason"]].values.tolist()
    )


def test_crlf_lines_and_an_empty_file(tmp_path: Path) -> None:
    f = tmp_path / "w.jsonl"
    f.write_bytes(json.dumps(CHAT).encode() + b"\r\n" + json.dumps(PROMPT_COMPLETION | {"x": 1}).encode() + b"\r\n")
    res = clean_file(f, "d", make_spec(source={"record_format": "chat"}))
    assert res.kept["row_id"].tolist() == ["c1"] and res.quarantine["reason"].tolist() == ["mixed_format"]
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    res = clean_file(empty, "d", make_spec(), source_name="dropped/e.jsonl")
    assert res.kept.empty and res.accounted() and res.rejection_rate == 1.0  # the gate stops the drop
    assert res.quarantine["reason"].tolist() == ["empty_file"] and "dropped/e.jsonl" in res.quarantine["detail"][0]


def test_token_bounds_use_the_base_tokenizer(tmp_path: Path, tiny_model: Path) -> None:
    from finetune_pipeline.data.tokens import TokenCounter

    rows = [
        {"id": "short", "prompt": "Hi?", "completion": "Hello."},
        {"id": "long", "prompt": "Tell me a story.", "completion": "Once upon a time " * 40},
    ]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    counter = TokenCounter(tiny_model)
    spec = make_spec(cleaning={"max_tokens": 60, "max_rejection_rate": 1.0, "quality": {"enabled": False}})
    res = clean_file(f, "d", spec, count_tokens=counter)
    assert res.kept["row_id"].tolist() == ["short"] and res.kept["tokens"].iloc[0] < 60
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] == "too_many_tokens" and "> cleaning.max_tokens=60" in q["detail"]


def test_numeric_ids_stay_on_the_fast_path_and_match_the_slow_one(tmp_path: Path) -> None:
    rows = [PROMPT_COMPLETION | {"id": i, "prompt": f"question {i}?"} for i in range(50)]
    f = write_jsonl(tmp_path / "n.jsonl", rows)
    res = readers.read_file(f, make_spec().source)
    assert len(res.tables) == 1 and res.tables[0].num_rows == 50 and not res.rejects
    assert res.tables[0].column("id").to_pylist()[:3] == ["0", "1", "2"]
    assert clean_file(f, "d", make_spec()).kept["row_id"].tolist() == [str(i) for i in range(50)]
