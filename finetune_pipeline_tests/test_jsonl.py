"""JSON Lines read in blocks of whole lines give the same rows, reasons, line numbers and blank-line count as one
block holding the whole file."""

import json
from pathlib import Path

import pytest

from finetune_pipeline.data.clean import clean_file
from finetune_pipeline.data.readers import jsonl
from finetune_pipeline_tests.conftest import make_spec

pytestmark = pytest.mark.unit


def test_blocks_of_lines_read_like_the_whole_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = []
    for i in range(300):
        rec = {"id": f"r{i}", "prompt": f"question {i} " * (i % 9 + 1), "completion": f"answer {i}."}
        lines.append(json.dumps(rec).encode())
        if i % 17 == 0:
            lines.append(b"   ")  # a blank line
        if i % 29 == 3:
            lines.append(b'{"id": "broken", "prompt": ')  # malformed
        if i % 31 == 4:
            lines.append(b'{"id": "bad\xff", "prompt": "p", "completion": "c"}')  # not UTF-8
    f = tmp_path / "b.jsonl"
    f.write_bytes(b"\n".join(lines))  # no newline at the end
    spec = make_spec(dedup={"near": False})
    whole = clean_file(f, "d", spec)
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 257)  # many blocks, lines cut at every block's end
    blocks = clean_file(f, "d", spec)
    assert blocks.kept.equals(whole.kept) and len(whole.kept) == 300
    assert blocks.quarantine.values.tolist() == whole.quarantine.values.tolist()
    assert {"invalid_json", "invalid_utf8"} <= set(whole.reasons)
    assert (blocks.rows_in, blocks.blank_lines, blocks.notes) == (whole.rows_in, whole.blank_lines, whole.notes)
    assert whole.blank_lines == 18
