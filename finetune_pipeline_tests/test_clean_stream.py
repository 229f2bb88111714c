"""A drop streams through clean_file batch by batch: cutting it into many batches, or writing the kept rows to a
file as they come, changes nothing in what is kept, quarantined or deduplicated (exactly or near, across batch
ends, with boilerplate ignored); and the memory a drop needs grows with a batch, not with the file."""

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from finetune_pipeline.data import clean, dedup
from finetune_pipeline.data.clean import KEPT_COLUMNS, clean_file
from finetune_pipeline.data.readers import csv_rows, jsonl
from finetune_pipeline_tests.conftest import make_spec

pytestmark = pytest.mark.unit

_ROOTS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()
WORDS = [a + b for a in _ROOTS for b in _ROOTS]  # 256 words
SYSTEM = "You are the support assistant of CloudSync. Answer in one short paragraph and be polite always."


def planted_rows(n: int, seed: int = 0, answer_words: int = 40) -> tuple[list[str], dict[str, set[int]]]:
    """JSON lines of chat rows: a shared system prompt (boilerplate), exact copies and near copies (an answer's last
    word replaced) of earlier rows far apart, and bad lines. Returns the lines and the planted copies' line numbers."""
    rng = random.Random(seed)
    rows: list[dict] = []
    planted: dict[str, set[int]] = {"exact": set(), "near": set(), "bad": set()}
    lines: list[str] = []
    for i in range(n):
        if i > 50 and i % 37 == 0:
            src = rows[rng.randrange(0, len(rows) // 2)]
            lines.append(json.dumps(src))
            planted["exact"].add(len(lines))
            continue
        if i > 50 and i % 41 == 0:
            src = json.loads(json.dumps(rows[rng.randrange(0, len(rows) // 2)]))
            words = src["messages"][-1]["content"].split()
            src["messages"][-1]["content"] = " ".join(words[:-1] + [f"zulu{i}"])
            src["id"] = f"near{i}"
            lines.append(json.dumps(src))
            planted["near"].add(len(lines))
            continue
        if i % 53 == 7:
            lines.append('{"id": "cut", "messages": [{"role": "user"')  # the reader rejects it
            planted["bad"].add(len(lines))
            continue
        if i % 59 == 11:
            lines.append(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": "no answer"}]}))
            planted["bad"].add(len(lines))  # the cleaning rejects it
            continue
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, answer_words)))
        row = {
            "id": f"r{i}",
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Ticket {i}: {question}"},
                {"role": "assistant", "content": answer},
            ],
        }
        rows.append(row)
        lines.append(json.dumps(row))
    return lines, planted


@pytest.fixture
def drop_file(tmp_path: Path) -> tuple[Path, dict[str, set[int]]]:
    lines, planted = planted_rows(900)
    f = tmp_path / "drop.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f, planted


def test_many_batches_clean_like_one(
    drop_file: tuple[Path, dict[str, set[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    f, planted = drop_file
    spec = make_spec()
    one = clean_file(f, "d", spec)
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 4096)  # ~25 batches: copies and their originals in different ones
    many = clean_file(f, "d", spec)
    assert many.kept.equals(one.kept) and len(one.kept) > 700
    assert many.quarantine.values.tolist() == one.quarantine.values.tolist()
    assert many.duplicates.values.tolist() == one.duplicates.values.tolist()
    assert (many.rows_in, many.notes, many.reasons) == (one.rows_in, one.notes, one.reasons)
    dups = many.duplicates
    assert set(dups.loc[dups["kind"] == "exact", "source_line"]) == planted["exact"]
    assert set(dups.loc[dups["kind"] == "near", "source_line"]) == planted["near"]
    assert set(many.quarantine["source_line"]) == planted["bad"]
    assert many.accounted()


def test_a_csv_file_cut_into_batches_cleans_like_one(
    drop_file: tuple[Path, dict[str, set[int]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The CSV reader parses rows as it reads (no whole-file text): tables of 256 rows clean like one table."""
    src, planted = drop_file
    f = tmp_path / "drop.csv"
    with f.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "messages"])
        for line in src.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                w.writerow(["cut", '[{"role": "user"'])  # invalid JSON in the list field
                continue
            w.writerow([rec["id"], json.dumps(rec["messages"])])
    spec = make_spec()
    one = clean_file(f, "d", spec)
    monkeypatch.setattr(csv_rows, "FLUSH_BYTES", 1)  # a table every 256 rows
    many = clean_file(f, "d", spec)
    assert many.kept.equals(one.kept) and len(one.kept) > 700
    assert many.quarantine.values.tolist() == one.quarantine.values.tolist()
    assert many.duplicates.values.tolist() == one.duplicates.values.tolist()
    dups = many.duplicates
    assert set(dups.loc[dups["kind"] == "exact", "source_line"]) == {n + 1 for n in planted["exact"]}  # the header
    assert set(dups.loc[dups["kind"] == "near", "source_line"]) == {n + 1 for n in planted["near"]}
    assert set(many.quarantine["source_line"]) == {n + 1 for n in planted["bad"]}


def test_streamed_near_dedup_finds_what_the_whole_batch_computation_finds(
    drop_file: tuple[Path, dict[str, set[int]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The near duplicates among the rows left after the exact dedup, by dedup.near_duplicates over all of them
    at once (every shingle in memory), are the ones clean_file reports, matched to the same rows."""
    f, _ = drop_file
    spec = make_spec()
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 4096)
    res = clean_file(f, "d", spec)
    no_near = clean_file(f, "d", make_spec(dedup={"near": False}))
    msgs = [json.loads(m) for m in no_near.kept["messages"]]
    sides = dedup.side_shingles(
        ["\n".join(x["content"] for x in m[:-1]) for m in msgs], [m[-1]["content"] for m in msgs], spec.dedup.ngram
    )
    whole = dedup.near_duplicates(
        sides, spec.dedup.near_threshold, spec.dedup.num_perm, boilerplate_share=spec.dedup.boilerplate_share
    )
    assert whole.boilerplate_shingles > 0  # the shared system prompt was ignored
    lines, ids = no_near.kept["source_line"].to_numpy(), no_near.kept["row_id"].to_numpy()
    expected = sorted(zip(lines[whole.row].tolist(), ids[whole.matched].tolist(), strict=True))
    near = res.duplicates[res.duplicates["kind"] == "near"]
    assert sorted(zip(near["source_line"].tolist(), near["duplicate_of"].tolist(), strict=True)) == expected
    assert len(expected) >= 15


def test_kept_rows_written_to_a_file_equal_the_rows_kept_in_memory(
    drop_file: tuple[Path, dict[str, set[int]]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    f, _ = drop_file
    monkeypatch.setattr(jsonl, "BLOCK_BYTES", 4096)
    spec = make_spec(cleaning={"pii": {"mode": "report"}})
    memory = clean_file(f, "d", spec)
    out, q = tmp_path / "state" / "kept.parquet", tmp_path / "state" / "quarantine.parquet"
    monkeypatch.setattr(clean, "QUARANTINE_HEAD_ROWS", 5)
    written = clean_file(f, "d", spec, kept_path=out, quarantine_path=q)
    assert written.kept_path == out and written.kept_problems == []
    assert pd.read_parquet(q).values.tolist() == memory.quarantine.values.tolist()  # reader's and rows' in line order
    assert written.quarantine.values.tolist() == memory.quarantine.head(5).values.tolist()
    assert written.quarantined == memory.quarantined == len(memory.quarantine) > 20
    assert written.reasons == memory.reasons and len(written.reasons) == 2
    assert written.accounted() and written.rejection_rate == memory.rejection_rate
    assert not list(out.parent.glob(".*"))  # the spill and the temporary file are gone
    on_disk = pd.read_parquet(out)
    assert list(on_disk.columns) == KEPT_COLUMNS
    assert on_disk["messages"].tolist() == memory.kept["messages"].tolist()
    small = [c for c in KEPT_COLUMNS if c != "messages"]
    assert written.kept[small].astype(str).equals(memory.kept[small].astype(str))
    assert written.duplicates.values.tolist() == memory.duplicates.values.tolist()


def test_a_row_found_to_be_a_near_duplicate_at_the_end_is_reported_as_one_in_the_pii_report(tmp_path: Path) -> None:
    base = "please reset the sync token for account alpha bravo charlie delta echo foxtrot golf hotel india"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{base} mail me at jo{i}@example.com"},
                {"role": "assistant", "content": f"done {ans}"},
            ]
        }
        for i, ans in enumerate(
            [
                "the token was reset and a new one mailed to you today kilo lima",
                "the token was reset and a new one mailed to you today kilo mike",
            ]
        )
    ]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = clean_file(f, "d", make_spec(cleaning={"pii": {"mode": "report"}}))
    assert res.duplicates["kind"].tolist() == ["near"]
    assert res.pii.sort_values("source_line")["outcome"].tolist() == ["kept", "duplicate"]


_LIVE = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
from finetune_pipeline.data import clean
from finetune_pipeline.data.readers import csv_rows, jsonl
from finetune_pipeline_tests.conftest import make_spec

jsonl.BLOCK_BYTES = 1 << 20
live = []
chunk = clean._Run.chunk


def recorded(self, pairs):
    chunk(self, pairs)
    rows = sum(len(x) for x in self.ids)
    live.append((rows, tracemalloc.get_traced_memory()[0] + pa.default_memory_pool().bytes_allocated()))


clean._Run.chunk = recorded
out = Path(sys.argv[2])
files = {"kept_path": out / "kept.parquet", "quarantine_path": out / "q.parquet"} if sys.argv[3] == "files" else {}
tracemalloc.start()
res = clean.clean_file(Path(sys.argv[1]), "d", make_spec(), **files)
print(json.dumps({"live": live, "kept": len(res.kept)}))
"""


@pytest.mark.parametrize("mode", ["files", "memory"])
def test_memory_between_batches_grows_by_a_few_fields_per_row_not_by_the_text(tmp_path: Path, mode: str) -> None:
    """What stays allocated between batches (Python's memory, traced, plus Arrow's pool: exact, without the
    allocators' retention), from the first quarter of a 9 MB drop to its end, per kept row. Writing the kept rows
    and the quarantine to files (what cleaned_dataset does): a few fields per row (id, line, hash, MinHash
    signature; under 1.5 KB), not the row's text. Collecting the kept rows in memory: more than their text."""
    lines, _ = planted_rows(2_400, seed=1, answer_words=600)
    f = tmp_path / "drop.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        [sys.executable, "-c", _LIVE, str(f), str(tmp_path), mode], capture_output=True, text=True, check=True
    )
    live = json.loads(out.stdout.strip().splitlines()[-1])["live"]
    assert len(live) >= 8
    (rows0, bytes0), (rows1, bytes1) = live[len(live) // 4], live[-1]
    per_row = (bytes1 - bytes0) / (rows1 - rows0)
    row_text = f.stat().st_size / len(lines)
    if mode == "files":
        assert per_row < 1536, (per_row, row_text)
    else:
        assert per_row > row_text, (per_row, row_text)
