"""Tier 1: cleaning.pii finds e-mail addresses, phone numbers, card numbers and secrets (detect-secrets,
phonenumbers, python-stdnum), masks them before hashing and dedup or only reports them; one case per kind and mode."""

from pathlib import Path

import pyarrow as pa
import pytest

from finetune_pipeline.data import pii
from finetune_pipeline.data.clean import clean_file
from finetune_pipeline_tests.conftest import make_spec, write_jsonl

pytestmark = pytest.mark.unit

CASES = {
    "email": ("write to jane.roe@example.org today", "jane.roe@example.org"),
    "phone": ("call me on (650) 253-0000 after five", "(650) 253-0000"),
    "card": ("my card is 4111 1111 1111 1111, please refund", "4111 1111 1111 1111"),
    "secret": ("the key AKIAIOSFODNN7EXAMPLE stopped working", "AKIAIOSFODNN7EXAMPLE"),
}
NOT_PII = {
    "email": "mail support at example dot org",
    "phone": "error 42 at line 7",
    "card": "order 4111 1111 1111 1112 is late",  # 16 digits, fails the Luhn check
    "secret": "the key AKIA is short",
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_kind_is_found_and_masked(kind: str) -> None:
    text, value = CASES[kind]
    found = pii.scan(pa.array([text, NOT_PII[kind]]), [kind], mask=True)
    assert found.counts() == {kind: 1}
    masked = found.texts.to_pylist()
    assert masked[0] == text.replace(value, pii.MASKS[kind])
    assert masked[1] == NOT_PII[kind]


def test_only_the_listed_kinds_are_looked_for() -> None:
    found = pii.scan(pa.array([CASES["email"][0]]), ["phone", "card"], mask=True)
    assert found.counts() == {} and found.texts.to_pylist() == [CASES["email"][0]]


def test_a_private_key_block_is_masked_to_its_end() -> None:
    text = "here: -----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY----- thanks"
    assert "MIIE" not in pii.scrub(text, ["secret"])


def _drop(tmp_path: Path) -> Path:
    rows = [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"Ticket {i}: {CASES[k][0]}"},
                {"role": "assistant", "content": f"Thanks, ticket {i} is logged under {k}."},
            ],
        }
        for i, k in enumerate(CASES)
    ]
    rows.append(rows[0] | {"id": "copy"})  # the same row again: still one exact duplicate after masking
    return write_jsonl(tmp_path / "d.jsonl", rows)


@pytest.mark.parametrize("mode", ["mask", "report"])
def test_modes_on_a_drop(tmp_path: Path, mode: str) -> None:
    spec = make_spec(cleaning={"pii": {"mode": mode}})
    res = clean_file(_drop(tmp_path), "d1", spec)
    assert res.pii_counts == {"card": 1, "email": 2, "phone": 1, "secret": 1}  # the copy counts too
    assert res.pii["outcome"].tolist() == ["kept"] * 4 + ["duplicate"]
    assert res.pii.set_index("row_id")["kinds"].to_dict()["r0"] == "email: 1"
    stored = " ".join(res.kept["messages"])
    for kind, (_, value) in CASES.items():
        assert (value in stored) == (mode == "report")
        assert (pii.MASKS[kind] in stored) == (mode == "mask")
    previews = " ".join(res.pii["preview"])  # masked in both modes
    assert not any(value in previews for _, value in CASES.values())
    assert len(res.duplicates) == 1


def test_mask_mode_dedups_rows_that_differ_only_in_masked_values(tmp_path: Path) -> None:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"reset for {who}@example.com"},
                {"role": "assistant", "content": "Done."},
            ]
        }
        for who in ("ann", "bob")
    ]
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    masked = clean_file(f, "d1", make_spec(cleaning={"pii": {"mode": "mask"}}))
    off = clean_file(f, "d1", make_spec())
    assert (len(masked.kept), len(masked.duplicates)) == (1, 1)  # masking happens before hashing
    assert (len(off.kept), len(off.duplicates), off.pii_counts) == (2, 0, {})


def test_mask_mode_scrubs_the_quarantine_preview(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "mail ann@example.com"}, {"role": "robot", "content": "x"}]}]
    spec = make_spec(cleaning={"pii": {"mode": "mask"}, "max_rejection_rate": 1.0})
    res = clean_file(write_jsonl(tmp_path / "d.jsonl", rows), "d1", spec)
    assert res.quarantine["reason"].tolist() == ["unknown_role"]
    assert "ann@example.com" not in res.quarantine["raw"].iat[0] and "[EMAIL]" in res.quarantine["raw"].iat[0]


def test_unknown_phone_region_is_a_spec_error() -> None:
    with pytest.raises(ValueError, match="unknown region"):
        make_spec(cleaning={"pii": {"mode": "mask", "phone_region": "XX"}})
