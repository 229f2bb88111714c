"""JSON documents read streaming (block by block) give the same rows, reasons, lines and notes as the document read
whole; objects of records keyed by id (chitchat's shape) are read as records with their key as row id."""

import functools
import json
import random
from pathlib import Path

import pytest

from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.readers import chunks, dispatch, json_document, json_stream, read_file
from finetune_pipeline_tests.conftest import make_spec

pytestmark = pytest.mark.unit


def sharegpt_array(path: Path, n: int, seed: int = 0, tail: bytes = b"\n]\n") -> None:
    """A pretty-printed ShareGPT-shaped array (as the public exports) with bad records planted among good ones."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        turns = [
            {
                "from": "human" if t % 2 == 0 else "gpt",
                "value": " ".join(rng.choice("ab cd ef é 東京".split()) for _ in range(rng.randint(3, 40))),
            }
            for t in range(rng.choice([2, 4, 6]))
        ]
        if rng.random() < 0.3:
            turns = turns[1:]  # starts with an assistant turn
        rec = {"id": f"c{i}" if i % 7 else i, "conversations": turns}
        if i % 23 == 5:
            rec["conversations"][0]["value"] = 5  # wrong type
        if i % 31 == 7:
            del rec["conversations"]  # missing field
        if i % 37 == 9:
            rec["conversations"] = None
        if i % 41 == 3:
            rec = ["not", "an", "object"]
        recs.append(json.dumps(rec, indent=2, ensure_ascii=False).encode())
    body = b"[\n" + b",\n".join(recs)
    bad = body.index(b'"value"', len(body) // 2)
    body = body[:bad] + b'"val\xffue"' + body[bad + 7 :]  # a byte that is not UTF-8 inside a key
    path.write_bytes(body + tail)


def _both(path: Path, spec, monkeypatch: pytest.MonkeyPatch, block: int):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(json_stream, "BLOCK", block)  # records cross the blocks' ends
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 20_000)  # several batches
    streamed = clean_file(path, "d", spec)
    monkeypatch.setitem(dispatch.READERS, "json", functools.partial(json_document.read, stream=False))
    whole = clean_file(path, "d", spec)
    return streamed, whole


@pytest.mark.parametrize("block", [997, 65536])
@pytest.mark.parametrize("tail", [b"\n]\n", b"\n]\n[1]", b',\n  {"id": "cut", "conversations": [{"fr', b""])
def test_streamed_array_equals_whole_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, tail: bytes
) -> None:
    f = tmp_path / "sharegpt.json"
    sharegpt_array(f, 400, tail=tail)
    spec = make_spec(dedup={"near": False})
    streamed, whole = _both(f, spec, monkeypatch, block)
    assert streamed.kept.equals(whole.kept) and len(streamed.kept) > 200
    cols = ["source_line", "reason", "detail", "raw"]
    assert streamed.quarantine[cols].values.tolist() == whole.quarantine[cols].values.tolist()
    assert {"bad_message", "missing_field", "null_field", "not_an_object"} <= set(streamed.reasons)
    assert (streamed.rows_in, streamed.notes) == (whole.rows_in, whole.notes)
    assert streamed.kept["source_line"].is_monotonic_increasing


def test_object_with_one_list_is_streamed_like_the_whole_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arr = tmp_path / "a.json"
    sharegpt_array(arr, 120)
    f = tmp_path / "o.json"
    f.write_bytes(b'{"version": 2, "meta": {"by": "x"},\n "data": ' + arr.read_bytes().strip() + b',\n "n": 120}\n')
    streamed, whole = _both(f, make_spec(dedup={"near": False}), monkeypatch, 1024)
    assert streamed.kept.equals(whole.kept) and len(streamed.kept) > 60
    assert streamed.quarantine.values.tolist() == whole.quarantine.values.tolist()
    assert streamed.notes == whole.notes and 'records read from key "data"' in streamed.notes


def chitchat(path: Path, n: int) -> dict:
    """chitchat-dataset's shape: conversation id -> {messages: [[turns of one sender], ...], ...}."""
    doc = {}
    for i in range(n):
        doc[f"{1000 + i:x}-conv"] = {
            "messages": [
                [{"sender": "alice", "text": f"hi, question {i}?", "timestamp": "2019-01-01"}],
                [{"sender": "bob", "text": "hello"}, {"sender": "bob", "text": f"answer number {i}."}],
            ],
            "ratings": {"alice": 4},
            "start": "2019-01-01T10:00:00",
        }
    path.write_text(json.dumps(doc, indent=1))
    return doc


def test_id_keyed_object_is_read_as_records_with_the_key_as_row_id(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "chitchat_hook.py").write_text(
        "def to_chat(rec):\n"
        "    assert set(rec) >= {'messages', 'ratings'}, rec\n"
        "    groups = rec['messages']\n"
        "    return [{'role': 'user' if k % 2 == 0 else 'assistant', 'content': ' '.join(m['text'] for m in g)}\n"
        "            for k, g in enumerate(groups)]\n"
    )
    monkeypatch.syspath_prepend(str(hooks))
    f = tmp_path / "chitchat.json"
    doc = chitchat(f, 30)
    spec = make_spec(source={"record_hook": "chitchat_hook:to_chat"}, dedup={"near": False})
    res = clean_file(f, "d", spec)
    assert res.rows_in == 30 and len(res.kept) == 30 and res.quarantine.empty
    assert res.kept["row_id"].tolist() == list(doc)
    assert any("values of the top-level object (30 records keyed by id, detected)" in n for n in res.notes)
    # chosen explicitly, and a record's own id field (columns.id) wins over the key
    doc["0x-own"] = {"uuid": "mine", "messages": [[{"text": "q?"}], [{"text": "an answer."}]], "ratings": {}}
    f.write_text(json.dumps(doc))
    spec = make_spec(
        source={"record_hook": "chitchat_hook:to_chat", "json_records": "values", "columns": {"id": "uuid"}},
        dedup={"near": False},
    )
    res = clean_file(f, "d", spec)
    assert len(res.kept) == 31 and res.kept["row_id"].tolist()[-1] == "mine"
    assert res.kept["row_id"].tolist()[:2] == list(doc)[:2]
    assert any("source.json_records: values" in n for n in res.notes)


def test_id_keyed_chat_records_without_a_hook(tmp_path: Path) -> None:
    f = tmp_path / "k.json"

    def chat(i: int) -> dict:
        return {"messages": [{"role": "user", "content": f"q{i}?"}, {"role": "assistant", "content": f"answer {i}."}]}

    f.write_text(json.dumps({"a1": chat(1), "b2": chat(2), "c3": {"messages": "nope"}}))
    res = clean_file(f, "d", make_spec(dedup={"near": False}))
    assert res.kept["row_id"].tolist() == ["a1", "b2"]
    assert res.quarantine["reason"].tolist() == ["messages_not_list"]


def test_an_object_not_understood_says_its_shape_and_the_option(tmp_path: Path) -> None:
    f = tmp_path / "odd.json"
    f.write_text(json.dumps({"train": [1], "test": [2], "info": {"v": 1}, "n": 3}))
    with pytest.raises(Exception) as exc:
        read_file(f, make_spec().source)
    msg = str(exc.value)
    assert "an object of 4 members (2 lists, 1 object, 1 value)" in msg
    assert "source.json_records_key" in msg and "source.json_records: values" in msg


def test_a_cut_off_id_keyed_object_keeps_the_records_before_the_cut(tmp_path: Path) -> None:
    f = tmp_path / "cut.json"
    rec = {"prompt": "What is two plus two?", "completion": "Four, of course."}
    text = json.dumps({f"k{i}": rec | {"prompt": f"What is {i} plus {i}?"} for i in range(5)}, indent=1)
    f.write_text(text[: text.index('"k3"') + 20])
    res = clean_file(f, "d", make_spec(source={"json_records": "values"}, dedup={"near": False}))
    assert res.kept["row_id"].tolist() == ["k0", "k1", "k2"]
    [q] = res.quarantine.to_dict("records")
    assert q["reason"] == "truncated_json" and "after 3 complete records" in q["detail"] and q["source_line"] > 10
    assert res.rows_in == 4 and res.accounted()
