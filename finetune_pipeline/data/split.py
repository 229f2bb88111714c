"""Combine all cleaned drops, dedup across drops (exact and near), and assign each row a split that never changes.

- random: a pure function of (salt, row id);
- stratified: each label keeps the split fractions; rows are assigned drop by drop in arrival order, the new
  rows of a label filling whichever split is below its share (ties by the row's hash), so earlier drops'
  assignments never depend on later drops;
- temporal: the same, but within a drop the newest rows fill test first, then validation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from finetune_pipeline.data import dedup
from finetune_pipeline.data.clean import DUPLICATE_COLUMNS, frame_digest
from finetune_pipeline.data.messages import prompt_answer_texts, prompt_texts
from finetune_pipeline.hashing import short_hash
from finetune_pipeline.layout import SPLITS
from finetune_pipeline.spec import DedupSpec, SplitSpec

DIGEST_COLUMNS = ["row_id", "content_hash"]
CONFLICT_COLUMNS = [
    "row_id",
    "conflicts_with",
    "drop",
    "source_line",
    "prompt_similarity",
    "answer_similarity",
    "action",
    "prompt",
    "answer",
    "other_answer",
]
CONFLICT_QUARANTINE_COLUMNS = ["drop", "source_line", "row_id", "reason", "detail", "messages"]
PREVIEW_CHARS = 200
MIX_COLUMNS = ["source", "weight", "max_rows", "train_rows", "mixed_rows", "validation_rows", "test_rows"]


def _unit(row_id: str, salt: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{salt}:{row_id}".encode()).digest()[:8], "big") / 2**64


def split_of(row_id: str, spec: SplitSpec) -> str:
    """The random-method split of a row: a pure function of (salt, row id), so a later drop never moves a row."""
    u = _unit(row_id, spec.salt)
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
    leaks: pd.DataFrame = field(default_factory=pd.DataFrame)  # test rows near-duplicating a train row
    conflicts: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CONFLICT_COLUMNS))
    conflict_quarantine: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CONFLICT_QUARANTINE_COLUMNS))
    rows_in: int = 0  # cleaned rows of all drops, before cross-drop dedup
    train_pool: int = -1  # rows the split assigned to train, before the training mix (-1: no mix, = len(train))
    mix: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MIX_COLUMNS))  # per source
    boilerplate_shingles: int = 0  # distinct shingles ignored as boilerplate in the cross-drop comparison

    @property
    def conflict_share(self) -> float:
        """Share of the deduplicated rows that take part in a label conflict (either side of a pair)."""
        involved = set(self.conflicts["row_id"]) | set(self.conflicts["conflicts_with"])
        total = sum(len(f) for f in self.frames.values()) + len(self.conflict_quarantine)
        return len(involved) / total if total else 0.0

    def digest(self, split: str) -> str:
        return frame_digest(self.frames[split], DIGEST_COLUMNS)

    @property
    def digests(self) -> dict[str, str]:
        return {s: self.digest(s) for s in SPLITS}

    @property
    def combined_digest(self) -> str:
        return short_hash(self.digests)


def _fill(n: int, have: dict[str, int], spec: SplitSpec) -> list[str]:
    """Splits for n new rows (in priority order) so that the group's counts approach the fractions."""
    total = sum(have.values()) + n
    out: list[str] = []
    for s, f in (("test", spec.test_fraction), ("validation", spec.validation_fraction)):
        need = int(np.floor(f * total + 0.5)) - have[s]
        take = max(0, min(need, n - len(out)))
        out += [s] * take
    out += ["train"] * (n - len(out))
    return out


def assign_splits(rows: pd.DataFrame, spec: SplitSpec, drops: list[str]) -> np.ndarray:
    """Split per row (rows in drop order; columns row_id, drop, label, timestamp)."""
    if spec.method == "random":
        return np.array([split_of(r, spec) for r in rows["row_id"]], dtype=object)
    out = np.empty(len(rows), dtype=object)
    u = np.array([_unit(r, spec.salt) for r in rows["row_id"]])
    key = rows["label"].astype("string").fillna("") if spec.method == "stratified" else pd.Series("", index=rows.index)
    counts: dict[str, dict[str, int]] = {}
    for d in drops:
        idx = np.flatnonzero((rows["drop"] == d).to_numpy())
        for label in pd.unique(key.to_numpy()[idx]):
            g = idx[key.to_numpy()[idx] == label]
            if spec.method == "temporal":
                ts = pd.to_datetime(rows["timestamp"].to_numpy()[g], utc=True)
                order = g[np.lexsort((u[g], -ts.astype("int64")))]  # newest first, ties by hash
            else:
                order = g[np.argsort(u[g], kind="stable")]
            have = counts.setdefault(str(label), dict.fromkeys(SPLITS, 0))
            for i, s in zip(order, _fill(len(order), have, spec), strict=True):
                out[i] = s
                have[s] += 1
    return out


def build_splits(
    cleaned: list[pd.DataFrame],
    spec: SplitSpec,
    drops: list[str] | None = None,
    dedup_spec: DedupSpec | None = None,
    mix: dict[str, tuple[float, int | None]] | None = None,
) -> SplitResult:
    """``cleaned`` in drop-registration order (``drops`` names them); the first occurrence of a row wins across
    drops, exact or near (when ``dedup_spec.near``). ``mix``: source name -> (weight, max_rows) for the training
    mix (``mix_train``), applied after dedup and after the splits are fixed."""
    frames = [f for f in cleaned if not f.empty]
    if not frames:
        raise ValueError("no cleaned rows: materialize cleaned_dataset for at least one drop that passes its gates")
    allrows = pd.concat(frames, ignore_index=True)
    for c in ("label", "timestamp"):
        if c not in allrows:
            allrows[c] = None
    first = ~allrows.duplicated("content_hash", keep="first")
    kept = allrows[first].reset_index(drop=True)
    dup = allrows[~first].copy()
    owner = kept.set_index("content_hash")["row_id"]
    dup["duplicate_of"] = dup["content_hash"].map(owner)
    dup["kind"], dup["similarity"] = "exact", 1.0
    # The same row id used for different content in two drops would make ids ambiguous: suffix later ones.
    clash = kept.duplicated("row_id", keep="first")
    kept.loc[clash, "row_id"] = kept.loc[clash, "row_id"] + "@" + kept.loc[clash, "drop"]
    dups = [dup]
    sides = None
    conflicts = pd.DataFrame(columns=CONFLICT_COLUMNS)
    quarantined = pd.DataFrame(columns=CONFLICT_QUARANTINE_COLUMNS)
    n_boiler = 0
    if dedup_spec is not None and len(kept) > 1:
        sides = dedup.side_shingles(*prompt_answer_texts(kept["messages"]), dedup_spec.ngram)
        nd = dedup.near_duplicates(
            sides,
            dedup_spec.near_threshold,
            dedup_spec.num_perm,
            boilerplate_share=dedup_spec.boilerplate_share,
            conflicts=True,
        )
        n_boiler = nd.boilerplate_shingles
        mask = np.ones(len(kept), bool)
        if dedup_spec.near and len(nd.row):
            near = kept.iloc[nd.row].copy()
            near["duplicate_of"] = kept["row_id"].to_numpy()[nd.matched]
            near["kind"], near["similarity"] = "near", np.round(nd.similarity, 4)
            dups.append(near)
            mask[nd.row] = False
        conflicts, drop_rows = conflict_table(kept, nd.conflicts, dedup_spec.conflicts, mask)
        if len(drop_rows):
            quarantined = conflict_quarantine(kept, drop_rows, conflicts)
            mask[drop_rows] = False
        if not mask.all():
            kept = kept[mask].reset_index(drop=True)
            sides = dedup.side_subset(sides, np.flatnonzero(mask))
    drops = list(drops) if drops is not None else list(dict.fromkeys(allrows["drop"]))
    split = assign_splits(kept, spec, drops)
    out = {s: kept[split == s].reset_index(drop=True) for s in SPLITS}
    train_rows = np.flatnonzero(split == "train")
    mix_table = pd.DataFrame(columns=MIX_COLUMNS)
    if mix:  # after dedup and after the splits are fixed: only train rows are sampled
        train_rows, mix_table = mix_train(kept, split, mix, spec.salt)
        out["train"] = kept.iloc[train_rows].reset_index(drop=True)
    leaks = pd.DataFrame(columns=["test_row_id", "train_row_id", "similarity"])
    if dedup_spec is not None and sides is not None:  # on the mixed training set (each distinct row once)
        leaks = test_train_leaks(kept, split, sides, dedup_spec, train_rows=np.unique(train_rows))
    return SplitResult(
        frames=out,
        cross_drop_duplicates=pd.concat(dups, ignore_index=True)[DUPLICATE_COLUMNS].reset_index(drop=True),
        drops=drops,
        leaks=leaks,
        conflicts=conflicts,
        conflict_quarantine=quarantined,
        rows_in=len(allrows),
        boilerplate_shingles=n_boiler,
        train_pool=int((split == "train").sum()),
        mix=mix_table,
    )


def mix_train(
    rows: pd.DataFrame, split: np.ndarray, mix: dict[str, tuple[float, int | None]], salt: str
) -> tuple[np.ndarray, pd.DataFrame]:
    """The training mix: positions of ``rows`` (with repeats) for the train split, per source ``weight`` (1 = as
    is, 2 = every row twice, 0.5 = a hash-chosen half) and ``max_rows`` (a cap). Only rows the split assigned to
    train are ever chosen, so a validation or test row can never be copied into training. The choice is a pure
    function of (salt, row id): the same rows stay in (or out of) the mix when new drops arrive."""
    src = rows["source"].astype("string").fillna("").to_numpy() if "source" in rows else np.full(len(rows), "")
    default = next(iter(mix))
    src = np.where(np.isin(src, list(mix)), src, default)  # rows of a source no longer in the spec: the first's
    picks, table = [], []
    for name, (weight, cap) in mix.items():
        mine = src == name
        train = np.flatnonzero(mine & (split == "train"))
        target = int(np.floor(len(train) * weight + 0.5))
        if cap is not None:
            target = min(target, cap)
        order = train[np.argsort([_unit(r, f"{salt}:mix") for r in rows["row_id"].to_numpy()[train]], kind="stable")]
        full, rest = divmod(target, len(train)) if len(train) else (0, 0)
        picks += [np.repeat(train, full), order[:rest]]
        table.append(
            {
                "source": name,
                "weight": weight,
                "max_rows": cap,
                "train_rows": len(train),
                "mixed_rows": target if len(train) else 0,
                "validation_rows": int((mine & (split == "validation")).sum()),
                "test_rows": int((mine & (split == "test")).sum()),
            }
        )
    chosen = np.sort(np.concatenate(picks).astype(np.int64), kind="stable") if picks else np.zeros(0, np.int64)
    return chosen, pd.DataFrame(table, columns=MIX_COLUMNS)


def conflict_table(
    rows: pd.DataFrame, pairs: pd.DataFrame, policy: str, alive: np.ndarray
) -> tuple[pd.DataFrame, np.ndarray]:
    """The conflict pairs (both rows, their prompt and both answers) and, by ``dedup.conflicts``, the rows to take
    out: keep_all none, keep_first every later row of a pair, quarantine every row of a pair."""
    pairs = pairs[alive[pairs["row"].to_numpy()] & alive[pairs["matched"].to_numpy()]] if len(pairs) else pairs
    if pairs.empty:
        return pd.DataFrame(columns=CONFLICT_COLUMNS), np.zeros(0, np.int64)
    q, a = pairs["row"].to_numpy(dtype=np.int64), pairs["matched"].to_numpy(dtype=np.int64)
    prompt, answer = prompt_answer_texts(rows["messages"].to_numpy()[np.concatenate([q, a])])
    n = len(q)
    action = {"keep_all": "kept", "keep_first": "later row quarantined", "quarantine": "both quarantined"}[policy]
    table = pd.DataFrame(
        {
            "row_id": rows["row_id"].to_numpy()[q],
            "conflicts_with": rows["row_id"].to_numpy()[a],
            "drop": rows["drop"].to_numpy()[q],
            "source_line": rows["source_line"].to_numpy()[q] if "source_line" in rows else 0,
            "prompt_similarity": pairs["prompt_similarity"].to_numpy(),
            "answer_similarity": pairs["answer_similarity"].to_numpy(),
            "action": action,
            "prompt": [t[:PREVIEW_CHARS] for t in prompt.to_pylist()[:n]],
            "answer": [t[:PREVIEW_CHARS] for t in answer.to_pylist()[:n]],
            "other_answer": [t[:PREVIEW_CHARS] for t in answer.to_pylist()[n:]],
        }
    )
    if policy == "keep_first":
        return table, np.unique(q)
    if policy == "quarantine":
        return table, np.unique(np.concatenate([q, a]))
    return table, np.zeros(0, np.int64)


def conflict_quarantine(rows: pd.DataFrame, drop_rows: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """Rows taken out for a label conflict (reason ``conflict``), each naming a row it conflicts with."""
    partner = dict(zip(table["row_id"], table["conflicts_with"], strict=True))
    partner.update({b: a for a, b in zip(table["row_id"], table["conflicts_with"], strict=True) if b not in partner})
    ids = rows["row_id"].to_numpy()[drop_rows]
    return pd.DataFrame(
        {
            "drop": rows["drop"].to_numpy()[drop_rows],
            "source_line": rows["source_line"].to_numpy()[drop_rows] if "source_line" in rows else 0,
            "row_id": ids,
            "reason": "conflict",
            "detail": [
                f"same or near-same prompt as row {partner.get(i)} with a different answer (dedup.conflicts)"
                for i in ids
            ],
            "messages": rows["messages"].to_numpy()[drop_rows],
        },
        columns=CONFLICT_QUARANTINE_COLUMNS,
    )


def test_train_leaks(
    rows: pd.DataFrame,
    split: np.ndarray,
    sides: dedup.Shingles,
    spec: DedupSpec,
    train_rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """Test rows that are near-duplicates of a train row (both sides reach near_threshold, boilerplate excluded).
    ``train_rows``: the distinct rows of the training mix (default: the rows the split assigned to train)."""
    train = np.flatnonzero(split == "train") if train_rows is None else train_rows
    test = np.flatnonzero(split == "test")
    order = np.concatenate([train, test])  # train first: every test row is compared with all train rows
    sub = dedup.side_subset(sides, order)
    is_test = np.zeros(len(order), bool)
    is_test[len(train) :] = True
    nd = dedup.near_duplicates(
        sub,
        spec.near_threshold,
        spec.num_perm,
        eligible_query=is_test,
        eligible_match=~is_test,
        boilerplate_share=spec.boilerplate_share,
    )
    ids = rows["row_id"].to_numpy()[order]
    return pd.DataFrame({"test_row_id": ids[nd.row], "train_row_id": ids[nd.matched], "similarity": nd.similarity})


def overlap_report(frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Rows shared between splits: exact content (must be 0) and same prompt with another answer (leak risk)."""
    report: dict[str, Any] = {}
    prompts = {s: set(prompt_texts(f["messages"]).to_pylist()) if len(f) else set() for s, f in frames.items()}
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        ca, cb = set(frames[a]["content_hash"]), set(frames[b]["content_hash"])
        pa, pb = prompts[a], prompts[b]
        ia, ib = set(frames[a]["row_id"]), set(frames[b]["row_id"])
        report[f"{a}_{b}_content_overlap"] = len(ca & cb)
        report[f"{a}_{b}_prompt_overlap"] = len(pa & pb)
        report[f"{a}_{b}_id_overlap"] = len(ia & ib)
    return report
