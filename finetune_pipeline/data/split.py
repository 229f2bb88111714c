"""Combine all cleaned drops, dedup across drops, and assign each row a split fixed by its id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from finetune_pipeline.data.clean import frame_digest
from finetune_pipeline.spec import SplitSpec

SPLITS = ("train", "validation", "test")
DIGEST_COLUMNS = ["row_id", "content_hash"]


def split_of(row_id: str, spec: SplitSpec) -> str:
    """The split a row belongs to: a pure function of (salt, row id), so a later drop never moves a row."""
    u = int.from_bytes(hashlib.sha256(f"{spec.salt}:{row_id}".encode()).digest()[:8], "big") / 2**64
    if u < spec.test_fraction:
        return "test"
    if u < spec.test_fraction + spec.validation_fraction:
        return "validation"
    return "train"


@dataclass
class SplitResult:
    frames: dict[str, pd.DataFrame]
    cross_drop_duplicates: pd.DataFrame
    drops: list[str]

    def digest(self, split: str) -> str:
        return frame_digest(self.frames[split], DIGEST_COLUMNS)

    @property
    def digests(self) -> dict[str, str]:
        return {s: self.digest(s) for s in SPLITS}

    @property
    def combined_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.digests, sort_keys=True).encode()).hexdigest()[:16]


def build_splits(cleaned: list[pd.DataFrame], spec: SplitSpec, drops: list[str] | None = None) -> SplitResult:
    """``cleaned`` in drop-registration order (``drops`` names them); the first occurrence of a content hash
    wins across drops."""
    frames = [f for f in cleaned if not f.empty]
    if not frames:
        raise ValueError("no cleaned rows: materialize cleaned_dataset for at least one drop that passes its gates")
    allrows = pd.concat(frames, ignore_index=True)
    first = ~allrows.duplicated("content_hash", keep="first")
    kept = allrows[first].copy()
    dup = allrows[~first].copy()
    owner = kept.set_index("content_hash")["row_id"]
    dup["duplicate_of"] = dup["content_hash"].map(owner)
    # The same row id used for different content in two drops would make ids ambiguous: suffix later ones.
    clash = kept.duplicated("row_id", keep="first")
    kept.loc[clash, "row_id"] = kept.loc[clash, "row_id"] + "@" + kept.loc[clash, "drop"]
    kept["split"] = [split_of(r, spec) for r in kept["row_id"]]
    out = {s: kept[kept["split"] == s].drop(columns="split").reset_index(drop=True) for s in SPLITS}
    drops = list(drops) if drops is not None else list(dict.fromkeys(allrows["drop"]))
    return SplitResult(
        frames=out,
        cross_drop_duplicates=dup[["drop", "source_line", "row_id", "duplicate_of", "content_hash"]].reset_index(
            drop=True
        ),
        drops=drops,
    )


def overlap_report(frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Rows shared between splits: exact content (must be 0) and same prompt with another answer (leak risk)."""
    report: dict[str, Any] = {}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        ca, cb = set(frames[a]["content_hash"]), set(frames[b]["content_hash"])
        pa, pb = set(frames[a]["prompt_hash"]), set(frames[b]["prompt_hash"])
        ia, ib = set(frames[a]["row_id"]), set(frames[b]["row_id"])
        report[f"{a}_{b}_content_overlap"] = len(ca & cb)
        report[f"{a}_{b}_prompt_overlap"] = len(pa & pb)
        report[f"{a}_{b}_id_overlap"] = len(ia & ib)
    return report


def to_prompt_completion(messages_json: str) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion record for trl: the loss then falls on the final assistant turn."""
    msgs = json.loads(messages_json)
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def training_fingerprint(drops: list[str], spec_hash: str) -> str:
    """What a trained adapter depends on: the set of ingested drops (content hashes) and the spec.
    The retraining schedule compares it with the one recorded on the last adapter."""
    return hashlib.sha256(json.dumps([sorted(drops), spec_hash]).encode()).hexdigest()[:16]
