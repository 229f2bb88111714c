"""Tier 1: files no one here wrote, dropped as a new user would (issue 9).

Every good row is kept, every bad one quarantined with its line, and every file-level failure names the dropped
file and a fix that works when followed (several cases follow the advice and check that the drop then passes)."""

from __future__ import annotations

import csv
import gzip
import json
import random
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finetune_pipeline.data.clean import clean_file
from finetune_pipeline_tests.conftest import chat_row, make_spec, write_jsonl

pytestmark = pytest.mark.unit

DROPPED = "/home/user/exports/my_export"  # the name the user dropped: file-level messages must use it


def _chat_lines(n: int) -> list[bytes]:
    return [json.dumps(chat_row(i)).encode() for i in range(n)]


def _check_all_accounted(res) -> None:  # type: ignore[no-untyped-def]
    assert res.accounted(), (res.rows_in, len(res.kept), len(res.quarantine), len(res.duplicates))


# --- 1. bytes that are not UTF-8 (and lone surrogate escapes) become invalid_utf8 rows on every path -------------


def _bad_jsonl(tmp: Path, bad: bytes) -> tuple[Path, int]:
    lines = _chat_lines(20)
    lines.insert(7, bad)
    f = tmp / "u.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    return f, 8


def _bad_json(tmp: Path, bad: bytes) -> tuple[Path, int]:
    lines = _chat_lines(20)
    lines.insert(7, bad)
    f = tmp / "u.json"
    f.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    return f, 9


def _bad_csv(tmp: Path, bad: bytes) -> tuple[Path, int]:
    f = tmp / "u.csv"
    rows = [f"r{i},question {i} about the export?,answer number {i}.".encode() for i in range(20)]
    rows.insert(7, b"rx,caf" + bad + b" question?,ok answer.")
    f.write_bytes(b"id,prompt,completion\n" + b"\n".join(rows) + b"\n")
    return f, 9


MSG_E9 = b'{"id": "x", "messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok."}]}'
MSG_FFFE = (
    b'{"id": "x", "messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": "\xff\xfe!"}]}'
)
MSG_SURR = (
    b'{"id": "x", "messages": [{"role": "user", "content": "a \\ud83d b"}, {"role": "assistant", "content": "ok."}]}'
)


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (_bad_jsonl, MSG_E9),
        (_bad_jsonl, MSG_FFFE),
        (_bad_jsonl, MSG_SURR),
        (_bad_json, MSG_E9),
        (_bad_json, MSG_SURR),
        (_bad_csv, b"\xe9"),
    ],
    ids=["jsonl-latin1-byte", "jsonl-fffe", "jsonl-lone-surrogate", "json-latin1-byte", "json-lone-surrogate", "csv"],
)
def test_bytes_that_are_not_utf8_are_quarantined_with_their_line(tmp_path: Path, make, bad: bytes) -> None:  # type: ignore[no-untyped-def]
    f, line = make(tmp_path, bad)
    res = clean_file(f, "d", make_spec(), source_name=DROPPED)
    assert len(res.kept) == 20
    assert res.quarantine[["source_line", "reason"]].values.tolist() == [[line, "invalid_utf8"]]
    assert "UTF-8" in res.quarantine["detail"][0] or "surrogate" in res.quarantine["detail"][0]
    _check_all_accounted(res)
    res.quarantine.to_parquet(tmp_path / "q.parquet")  # the quarantine itself can be stored


# --- 2. json_records_key: every list under the key is read, or the file stops listing the places ---------------


def _conv(i: int) -> dict:
    return {"conversations": [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."}]}


def test_records_key_in_several_places_reads_every_list(tmp_path: Path) -> None:
    doc = {
        "shards": {
            "s1": {"records": [_conv(i) for i in range(10)]},
            "s2": {"meta": {"n": 20}, "records": [_conv(i) for i in range(10, 30)]},
        }
    }
    f = tmp_path / "shards.json"
    f.write_text(json.dumps(doc, indent=1))
    res = clean_file(f, "d", make_spec(source={"json_records_key": "records"}))
    assert len(res.kept) == 30 and res.rows_in == 30 and res.quarantine.empty
    assert any("$.shards.s1.records" in n and "$.shards.s2.records" in n for n in res.notes)
    # source lines point at each record in the file
    text = f.read_text().splitlines()
    line = int(res.kept["source_line"].iloc[12])
    assert "question 12?" in "\n".join(text[line - 1 : line + 6])


def test_records_key_that_is_a_field_of_the_records_stops_with_the_places(tmp_path: Path) -> None:
    doc = {"export": {"conversations": [chat_row(i) for i in range(7)]}}
    f = tmp_path / "export.json"
    f.write_text(json.dumps(doc))
    res = clean_file(f, "d", make_spec(source={"json_records_key": "messages"}), source_name=DROPPED)
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] == "ambiguous_records_key" and DROPPED in q["detail"]
    assert "7 places" in q["detail"] and "$.export.conversations[0].messages" in q["detail"]
    assert "json_records_key: conversations" in q["detail"]
    fixed = clean_file(f, "d", make_spec(source={"json_records_key": "conversations"}))  # the advice, followed
    assert len(fixed.kept) == 7 and fixed.quarantine.empty


# --- 3. empty and record-less files stop the drop, naming the dropped file ---------------------------------------


def _write(tmp: Path, name: str, content: bytes | None) -> Path:
    f = tmp / name
    if name.endswith(".parquet"):
        pq.write_table(pa.table({"messages": pa.array([], pa.string())}), f)
    else:
        f.write_bytes(content or b"")
    return f


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("a.jsonl", b"", "empty_file"),
        ("a.json", b"", "empty_file"),
        ("a.csv", b"", "empty_file"),
        ("a.jsonl", b"\n\n  \n\r\n", "no_records"),
        ("a.json", b"[]", "no_records"),
        ("a.json", b'{"data": []}', "no_records"),
        ("a.json", b"  \n ", "no_records"),
        ("a.csv", b"id,prompt,completion\n", "no_records"),
        ("a.parquet", None, "no_records"),
    ],
    ids=[
        "jsonl-0-bytes",
        "json-0-bytes",
        "csv-0-bytes",
        "jsonl-blank-lines",
        "json-empty-array",
        "json-object-empty-list",
        "json-whitespace",
        "csv-header-only",
        "parquet-no-rows",
    ],
)
def test_empty_and_recordless_files_stop_the_drop(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    f = _write(tmp_path, name, content)
    res = clean_file(f, "d", make_spec(), source_name=DROPPED + Path(name).suffix)
    assert res.kept.empty and res.rejection_rate == 1.0  # the blocking gate stops it: not a training drop
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] == reason and DROPPED in q["detail"] and "drop a file" in q["detail"]
    _check_all_accounted(res)


# --- 5. advice that works: binary noise, archives, misnamed files, mixed formats, unknown fields -----------------


def test_binary_noise_says_it_is_not_text(tmp_path: Path) -> None:
    f = tmp_path / "noise.jsonl"
    f.write_bytes(random.Random(0).randbytes(20_000))
    res = clean_file(f, "d", make_spec(), source_name=DROPPED)
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] in ("not_jsonl", "binary_file") and DROPPED in q["detail"]
    assert "record_format" not in q["detail"] and "UTF-8" in q["detail"]


@pytest.mark.parametrize(
    ("name", "payload", "reason", "advice"),
    [
        ("x.jsonl", gzip.compress(b'{"a": 1}\n'), "binary_file", "gunzip"),
        ("x.jsonl", b"PK\x03\x04" + bytes(200), "binary_file", "CSV"),
        ("x.jsonl", b"PAR1" + bytes(100), "binary_file", ".parquet"),
    ],
    ids=["gzip", "zip-or-xlsx", "parquet-named-jsonl"],
)
def test_archives_and_binary_formats_name_the_fix(
    tmp_path: Path, name: str, payload: bytes, reason: str, advice: str
) -> None:
    f = tmp_path / name
    f.write_bytes(payload)
    [q] = clean_file(f, "d", make_spec(), source_name=DROPPED).quarantine.to_dict("records")
    assert q["reason"] == reason and advice in q["detail"] and DROPPED in q["detail"]


def test_csv_named_jsonl_says_csv(tmp_path: Path) -> None:
    f = tmp_path / "x.jsonl"
    f.write_text("id,prompt,completion\n1,q?,a.\n")
    [q] = clean_file(f, "d", make_spec(), source_name=DROPPED).quarantine.to_dict("records")
    assert q["reason"] == "not_jsonl" and "csv" in q["detail"].lower()


@pytest.mark.parametrize("layout", ["pretty-array-in-jsonl", "jsonl-in-json"])
def test_a_json_document_or_json_lines_under_the_other_extension_is_read(tmp_path: Path, layout: str) -> None:
    rows = [chat_row(i) for i in range(5)]
    if layout == "pretty-array-in-jsonl":
        f = tmp_path / "x.jsonl"
        f.write_text(json.dumps(rows, indent=2))
    else:
        f = write_jsonl(tmp_path / "x.json", rows)
    res = clean_file(f, "d", make_spec())
    assert len(res.kept) == 5 and res.quarantine.empty and res.notes


MIXED = [
    chat_row(1),
    {"id": "a", "instruction": "Translate to French.", "input": "dog", "output": "chien."},
    {"id": "p", "prompt": "Capital of Peru?", "completion": "Lima."},
    {"id": "s", "conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    {"id": "t", "text": "A plain paragraph of text to continue pre-training on, long enough."},
    chat_row(2),
    {"id": "?", "question": "no known format"},
]


def test_a_mixed_file_gets_advice_that_works(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "mixed.jsonl", MIXED[:-1] * 2)
    res = clean_file(f, "d", make_spec(), source_name=DROPPED)
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] == "unknown_format" and "record_format: mixed" in q["detail"] and DROPPED in q["detail"]
    f = write_jsonl(tmp_path / "mixed2.jsonl", MIXED)
    res = clean_file(f, "d", make_spec(source={"record_format": "mixed"}))  # the advice, followed
    assert sorted(res.kept["row_id"]) == ["a", "p", "r1", "r2", "s", "t"]
    assert res.kept["source_line"].tolist() == [1, 2, 3, 4, 5, 6]  # file order
    assert res.quarantine[["source_line", "reason"]].values.tolist() == [[7, "unknown_record_format"]]
    _check_all_accounted(res)


@pytest.mark.parametrize("file_format", ["jsonl", "json", "csv", "parquet"])
def test_mixed_record_format_in_every_file_format(tmp_path: Path, file_format: str) -> None:
    rows = [{k: v for k, v in r.items()} for r in MIXED[1:4]]
    f = tmp_path / f"m.{file_format}"
    if file_format == "jsonl":
        write_jsonl(f, rows)
    elif file_format == "json":
        f.write_text(json.dumps(rows))
    elif file_format == "parquet":
        fields = sorted({k for r in rows for k in r})  # every column in every row (from_pylist reads the first's keys)
        flat = [{k: json.dumps(r[k]) if isinstance(r.get(k), list) else r.get(k) for k in fields} for r in rows]
        pq.write_table(pa.Table.from_pylist(flat), f)
    else:
        fields = sorted({k for r in rows for k in r})
        with f.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    res = clean_file(f, "d", make_spec(source={"record_format": "mixed"}))
    expected = ["a", "p"] if file_format == "parquet" else ["a", "p", "s"]  # Parquet: lists as JSON text are not lists
    assert sorted(res.kept["row_id"]) == expected
    _check_all_accounted(res)


def test_unknown_fields_get_a_column_mapping_that_works(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"question {i}?", "a": f"answer {i}."} for i in range(5)])
    [q] = clean_file(f, "d", make_spec(), source_name=DROPPED).quarantine.to_dict("records")
    assert q["reason"] == "unknown_format" and "columns: {prompt: q, completion: a}" in q["detail"]
    spec = make_spec(source={"record_format": "prompt_completion", "columns": {"prompt": "q", "completion": "a"}})
    assert len(clean_file(f, "d", spec).kept) == 5


# --- 6. ShareGPT exports: leading assistant turns and speaker names ------------------------------------------------

CONTINUATION = {
    "id": "cont",
    "conversations": [
        {"from": "gpt", "value": "...and that is the second half of the recipe."},
        {"from": "human", "value": "Thanks! How long does it bake?"},
        {"from": "gpt", "value": "About 40 minutes at 180 degrees."},
    ],
}


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("quarantine", None),
        (
            "drop",
            [
                {"role": "user", "content": "Thanks! How long does it bake?"},
                {"role": "assistant", "content": "About 40 minutes at 180 degrees."},
            ],
        ),
        (
            "context",
            [
                {
                    "role": "system",
                    "content": "Earlier in this conversation, the assistant said:\n...and that is the second half of "
                    "the recipe.",
                },
                {"role": "user", "content": "Thanks! How long does it bake?"},
                {"role": "assistant", "content": "About 40 minutes at 180 degrees."},
            ],
        ),
    ],
)
def test_conversations_that_begin_with_the_assistant(tmp_path: Path, policy: str, expected: list | None) -> None:
    f = write_jsonl(tmp_path / "sg.jsonl", [CONTINUATION, {**CONTINUATION, "id": "sys", "system": "Be a chef."}])
    res = clean_file(f, "d", make_spec(source={"leading_assistant": policy}, dedup={"near": False}))
    _check_all_accounted(res)
    if expected is None:
        assert res.quarantine["reason"].tolist() == ["misordered_roles"] * 2 and res.kept.empty
        return
    by_id = {r: json.loads(m) for r, m in zip(res.kept["row_id"], res.kept["messages"], strict=True)}
    assert by_id["cont"] == expected
    with_sys = by_id["sys"]
    assert with_sys[0]["role"] == "system" and with_sys[0]["content"].startswith("Be a chef.")
    assert ("second half" in with_sys[0]["content"]) == (policy == "context")
    assert any("began with assistant turns" in n for n in res.notes)


def test_default_keeps_sharegpt_continuations_and_maps_bing(tmp_path: Path) -> None:
    rows = [
        CONTINUATION,
        {"id": "bing", "conversations": [{"from": "human", "value": "hi?"}, {"from": "bing", "value": "Hello."}]},
    ]
    res = clean_file(write_jsonl(tmp_path / "sg.jsonl", rows), "d", make_spec())
    assert sorted(res.kept["row_id"]) == ["bing", "cont"] and res.quarantine.empty


@pytest.mark.parametrize("fmt", ["chat", "sharegpt"])
def test_spec_role_map_names_any_speaker(tmp_path: Path, fmt: str) -> None:
    if fmt == "chat":
        rec = {
            "id": "x",
            "messages": [
                {"role": "customer", "content": "Where is my order?"},
                {"role": "Agent", "content": "On its way."},
            ],
        }
    else:
        rec = {
            "id": "x",
            "conversations": [
                {"from": "customer", "value": "Where is my order?"},
                {"from": "Agent", "value": "On its way."},
            ],
        }
    f = write_jsonl(tmp_path / "r.jsonl", [rec])
    before = clean_file(f, "d", make_spec())
    assert before.quarantine["reason"].tolist() == ["unknown_role"] and "customer" in before.quarantine["detail"][0]
    res = clean_file(f, "d", make_spec(source={"roles": {"customer": "user", "agent": "assistant"}}))
    assert [m["role"] for m in json.loads(res.kept["messages"][0])] == ["user", "assistant"]


# --- the record hook: one raw record in, messages out; its failures are quarantined per row ----------------------

HOOK = """
def to_messages(rec):
    if rec.get("boom"):
        raise KeyError("turns")
    if rec.get("nothing"):
        return None
    return [{"role": "user" if t["who"] == "q" else "assistant", "content": t["say"]} for t in rec["thread"]["turns"]]
"""


@pytest.mark.parametrize("file_format", ["jsonl", "json"])
def test_record_hook_converts_nested_records_and_quarantines_its_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_format: str
) -> None:
    (tmp_path / "my_hooks_issue9.py").write_text(HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_hooks_issue9", raising=False)
    rows = [
        {"id": "n1", "thread": {"turns": [{"who": "q", "say": "Ping?"}, {"who": "a", "say": "Pong."}]}},
        {"id": "n2", "boom": True},
        {"id": "n3", "nothing": True},
        {"id": "n4", "thread": {"turns": [{"who": "q", "say": "Two?"}, {"who": "a", "say": "Yes, two."}]}},
    ]
    f = tmp_path / f"h.{file_format}"
    write_jsonl(f, rows) if file_format == "jsonl" else f.write_text(json.dumps(rows, indent=0))
    res = clean_file(f, "d", make_spec(source={"record_hook": "my_hooks_issue9:to_messages"}))
    assert sorted(res.kept["row_id"]) == ["n1", "n4"]
    assert res.quarantine["reason"].tolist() == ["hook_failed", "hook_failed"]
    assert "KeyError" in res.quarantine["detail"][0]
    _check_all_accounted(res)


def test_record_hook_that_cannot_be_imported_names_the_fix(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "h.jsonl", [chat_row(1)])
    res = clean_file(f, "d", make_spec(source={"record_hook": "no_such_module_x:f"}), source_name=DROPPED)
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] == "hook_not_found" and "PYTHONPATH" in q["detail"] and DROPPED in q["detail"]


# --- 4. half files: a drop is only ingested once it is complete ----------------------------------------------------

HALF = json.dumps(chat_row(1)) + "\n" + json.dumps(chat_row(2))[:40]


def _scan(inc: Path, **kw):  # type: ignore[no-untyped-def]
    from finetune_pipeline.data.drops import scan_incoming

    return scan_incoming(inc, "*", 0, None, set(), **kw)


@pytest.mark.parametrize(
    ("name", "partial", "rest"),
    [
        ("a.jsonl", HALF.encode(), (json.dumps(chat_row(2))[40:] + "\n").encode()),
        ("a.jsonl", json.dumps(chat_row(1)).encode(), b"\n"),  # the last line has no newline yet
        ("a.json", b'[{"prompt": "q?", "completion": "a."},\n', b'{"prompt": "q2?", "completion": "b."}]'),
        ("a.json", b'[{"prompt": "q?", "completion": "a."}, {"x": {"y": 1}}', b"]"),  # ends in } but not closed
    ],
    ids=["jsonl-cut-mid-line", "jsonl-no-final-newline", "json-array-open", "json-ends-in-brace"],
)
def test_a_file_that_looks_unfinished_waits(tmp_path: Path, name: str, partial: bytes, rest: bytes) -> None:
    inc = tmp_path / "in"
    inc.mkdir()
    f = inc / name
    f.write_bytes(partial)
    res = _scan(inc)
    assert res.ready == [] and res.waiting == [str(f)] and str(f) in res.why
    assert "ingested anyway" in res.why[str(f)]
    assert len(_scan(inc, incomplete_grace_seconds=0).ready) == 1  # past the grace period it is ingested
    with f.open("ab") as fh:
        fh.write(rest)
    assert [d.path for d in _scan(inc).ready] == [f]


def test_parquet_without_its_footer_waits(tmp_path: Path) -> None:
    inc = tmp_path / "in"
    inc.mkdir()
    whole = tmp_path / "w.parquet"
    pq.write_table(pa.table({"prompt": ["q?"], "completion": ["a."]}), whole)
    data = whole.read_bytes()
    f = inc / "p.parquet"
    f.write_bytes(data[:-10])
    assert _scan(inc).ready == [] and "Parquet footer" in _scan(inc).why[str(f)]
    f.write_bytes(data)
    assert len(_scan(inc).ready) == 1


def test_a_writer_that_pauses_longer_than_settle_seconds_is_waited_for(tmp_path: Path) -> None:
    """The issue's half file: 151 complete lines written, the writer pauses with the file still open."""
    inc = tmp_path / "in"
    inc.mkdir()
    f = inc / "big.jsonl"
    with f.open("w") as fh:
        for i in range(151):
            fh.write(json.dumps(chat_row(i)) + "\n")
        fh.flush()
        first = _scan(inc)
        assert first.ready == [] and "open for writing" in first.why[str(f)]
        for i in range(151, 300):
            fh.write(json.dumps(chat_row(i)) + "\n")
    [drop] = _scan(inc).ready
    assert sum(1 for _ in drop.path.open()) == 300


@pytest.mark.parametrize("marker", ["{name}.done", "_SUCCESS"])
def test_a_done_marker_decides_when_a_file_is_complete(tmp_path: Path, marker: str) -> None:
    inc = tmp_path / "in"
    inc.mkdir()
    f = write_jsonl(inc / "a.jsonl", [chat_row(1)])
    res = _scan(inc, done_marker=marker)
    assert res.ready == [] and "marker" in res.why[str(f)]
    (inc / marker.replace("{name}", f.name)).write_text("")
    res = _scan(inc, done_marker=marker)
    assert [d.path for d in res.ready] == [f] and res.waiting == []  # the marker itself is never a drop


def test_a_zero_byte_file_is_ingested_and_stops_with_empty_file(tmp_path: Path) -> None:
    inc = tmp_path / "in"
    inc.mkdir()
    f = inc / "empty.jsonl"
    f.write_bytes(b"")
    [drop] = _scan(inc).ready  # not "settling" forever
    res = clean_file(drop.path, "d", make_spec(), source_name=str(f))
    assert res.quarantine["reason"].tolist() == ["empty_file"] and str(f) in res.quarantine["detail"][0]


def test_json_document_fast_path_agrees_with_record_by_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_pipeline.data.readers import chunks as formats

    rows = [chat_row(i) for i in range(30)]
    rows[3] = {"id": "m", "messages": None}
    rows[9] = {"id": "n", "messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a."}]}
    rows[17] = {"id": "o", "messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a."}]}
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows, indent=2))
    spec = make_spec(dedup={"near": False})
    fast = clean_file(f, "d", spec)
    monkeypatch.setattr(formats, "_read_chunk", lambda *a, **k: None)  # Arrow declines every chunk
    slow = clean_file(f, "d", spec)
    assert fast.kept.equals(slow.kept) and len(fast.kept) == 27
    cols = ["source_line", "reason"]
    assert fast.quarantine[cols].values.tolist() == slow.quarantine[cols].values.tolist()
    assert [r for _, r in fast.quarantine[cols].values.tolist()] == ["null_field", "bad_message", "unknown_role"]
