"""Tests for the deterministic ticket_triage demo data generator."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from examples.demo_tickets import (
    CATEGORIES,
    CATEGORY_CUES,
    DEMO_DROPS,
    FAULT_KINDS,
    LABEL_KEYS,
    MIN_TICKET_WORDS,
    PRIORITIES,
    PRIORITY_AMOUNT_RANGES,
    PRIORITY_CUES,
    PRODUCTS,
    SENTIMENT_CUES,
    SENTIMENTS,
    SYSTEM_PROMPT,
    generate_tickets,
    is_valid_row,
    main,
    write_demo_drops,
)

pytestmark = pytest.mark.unit

ALLOWED = {"category": CATEGORIES, "priority": PRIORITIES, "product": PRODUCTS, "sentiment": SENTIMENTS}


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return generate_tickets(1000, seed=11)


@pytest.fixture(scope="module")
def drops(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_demo_drops(tmp_path_factory.mktemp("drops"), seed=7)


def _labels(row: dict[str, Any]) -> dict[str, str]:
    labels = json.loads(row["messages"][-1]["content"])
    assert isinstance(labels, dict)
    return labels


def _text(row: dict[str, Any]) -> str:
    return str(row["messages"][1]["content"])


def _read_lines(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n")
    return raw[:-1].split("\n")


def _valid_rows(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in _read_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if is_valid_row(obj):
            out.append(obj)
    return out


# --- generate_tickets ------------------------------------------------------------------------------


def test_deterministic_and_seed_dependent() -> None:
    a = generate_tickets(200, seed=5)
    assert a == generate_tickets(200, seed=5)
    assert generate_tickets(50, seed=5) == a[:50]
    b = generate_tickets(200, seed=6)
    assert [_text(r) for r in a] != [_text(r) for r in b]
    assert len({_text(r) for r in a} & {_text(r) for r in b}) < 10


def test_row_shape(rows: list[dict[str, Any]]) -> None:
    assert [r["id"] for r in rows] == [f"tt-11-{i}" for i in range(1000)]
    for row in rows:
        assert set(row) == {"id", "messages"}
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM_PROMPT
        assert is_valid_row(row)


def test_labels_in_allowed_sets_and_key_order(rows: list[dict[str, Any]]) -> None:
    seen: dict[str, set[str]] = {k: set() for k in LABEL_KEYS}
    for row in rows:
        labels = _labels(row)
        assert tuple(labels) == LABEL_KEYS
        assert row["messages"][-1]["content"] == json.dumps(labels)
        for key, value in labels.items():
            assert value in ALLOWED[key]
            seen[key].add(value)
    # every label value actually occurs
    assert all(seen[k] == set(ALLOWED[k]) for k in LABEL_KEYS)


def test_system_prompt_lists_label_space() -> None:
    for key, values in ALLOWED.items():
        assert key in SYSTEM_PROMPT
        for value in values:
            assert value in SYSTEM_PROMPT


def test_product_named_in_text(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        text = _text(row)
        named = [p for p in PRODUCTS if p in text]
        assert named == [_labels(row)["product"]], text


def test_priority_follows_from_cues(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        text = _text(row).lower()
        priority = _labels(row)["priority"]
        assert any(cue in text for cue in PRIORITY_CUES[priority]), (priority, text)
        for other, cues in PRIORITY_CUES.items():
            if other != priority:
                assert not any(cue in text for cue in cues), (priority, other, text)


def test_urgent_tickets_contain_urgent_cue(rows: list[dict[str, Any]]) -> None:
    urgent = [r for r in rows if _labels(r)["priority"] == "urgent"]
    assert len(urgent) > 50
    for row in urgent:
        assert any(cue in _text(row).lower() for cue in PRIORITY_CUES["urgent"])


def test_billing_amount_scales_with_priority(rows: list[dict[str, Any]]) -> None:
    billing = [r for r in rows if _labels(r)["category"] == "billing"]
    assert billing
    for row in billing:
        amounts = re.findall(r"\$([\d,]+\.\d\d)", _text(row))
        assert amounts, _text(row)
        low, high = PRIORITY_AMOUNT_RANGES[_labels(row)["priority"]]
        for amount in amounts:
            assert low <= float(amount.replace(",", "")) <= high


def test_sentiment_follows_from_tone(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        text = _text(row).lower()
        sentiment = _labels(row)["sentiment"]
        pos = any(cue in text for cue in SENTIMENT_CUES["positive"])
        neg = any(cue in text for cue in SENTIMENT_CUES["negative"])
        assert (pos, neg) == {"positive": (True, False), "negative": (False, True), "neutral": (False, False)}[
            sentiment
        ], (sentiment, text)


def test_category_cue_present(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        text = _text(row).lower()
        assert any(cue in text for cue in CATEGORY_CUES[_labels(row)["category"]]), text


def test_variety_and_length(rows: list[dict[str, Any]]) -> None:
    texts = [_text(r) for r in rows]
    assert len(set(texts)) >= 500
    words = [len(t.split()) for t in texts]
    assert min(words) >= MIN_TICKET_WORDS
    assert max(words) <= 90
    # label combinations are spread out
    combos = Counter((lab["category"], lab["priority"]) for lab in map(_labels, rows))
    assert len(combos) >= 15


# --- write_demo_drops ------------------------------------------------------------------------------


def test_drops_written_sorted_and_byte_identical(tmp_path: Path, drops: list[Path]) -> None:
    assert drops == sorted(drops)
    assert [p.name for p in drops] == sorted(spec.filename for spec in DEMO_DROPS)
    assert len(drops) >= 2
    again = write_demo_drops(tmp_path / "again", seed=7)
    assert [p.name for p in again] == [p.name for p in drops]
    for a, b in zip(drops, again, strict=True):
        assert a.read_bytes() == b.read_bytes()
    other = write_demo_drops(tmp_path / "other", seed=8)
    assert other[0].read_bytes() != drops[0].read_bytes()


def test_drop_row_counts(drops: list[Path]) -> None:
    per_file = [_valid_rows(p) for p in drops]
    assert all(len(rows) >= 800 for rows in per_file)
    distinct = {json.dumps(r, sort_keys=True) for rows in per_file for r in rows}
    assert len(distinct) >= 2000
    assert len({r["id"] for rows in per_file for r in rows}) == len(distinct)


def test_duplicates_planted(drops: list[Path]) -> None:
    first_lines: set[str] = set()
    for index, path in enumerate(drops):
        valid = [json.dumps(r) for r in _valid_rows(path)]
        counts = Counter(valid)
        n_dups = sum(c - 1 for c in counts.values())
        assert 0.01 * len(counts) <= n_dups <= 0.03 * len(counts) + 1
        # duplicates share the id of their original
        ids = Counter(json.loads(line)["id"] for line in valid)
        assert sum(c - 1 for c in ids.values()) == n_dups
        if index == 0:
            first_lines = set(counts)
        else:
            cross = set(counts) & first_lines
            assert 0.01 * len(counts) <= len(cross) <= 0.03 * len(counts)


def _fault_kind(line: str) -> str | None:
    if line == "":
        return "blank_line"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return "truncated_json"
    if "messages" not in obj:
        return "missing_messages"
    last = obj["messages"][-1]
    if last["role"] != "assistant":
        return "no_assistant_turn"
    if last["content"] is None:
        return "null_assistant"
    if last["content"] == "":
        return "empty_assistant"
    return None


def test_each_fault_planted_once_per_file(drops: list[Path]) -> None:
    for path in drops:
        lines = _read_lines(path)
        kinds = Counter(k for k in map(_fault_kind, lines) if k is not None)
        assert kinds == Counter(FAULT_KINDS), path.name
        assert lines[0] != ""
        assert len(lines) - len(_valid_rows(path)) == len(FAULT_KINDS)
        assert sum(kinds.values()) <= 0.01 * len(lines)


def test_main_prints_paths_and_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--seed", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(DEMO_DROPS)
    for line, spec in zip(out, sorted(DEMO_DROPS, key=lambda s: s.filename), strict=True):
        assert spec.filename in line
        assert "valid rows" in line
