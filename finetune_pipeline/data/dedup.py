"""Near-duplicate detection: word n-gram shingles, MinHash signatures (rensa, Rust) and LSH banding.

The whole batch is processed column-wise: shingles are hashed with Arrow and NumPy (no Python loop per row),
rensa computes all signatures in one call and flags every row that shares an LSH band with another row. Only
those flagged rows (a few percent in practice) are then banded again here to find which earlier row each one
matches, and every candidate pair is verified with the exact Jaccard similarity of the two shingle sets, so a
reported duplicate is never an LSH false positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_PUNCT = "\"'.,;:!?()[]{}<>`*_~-/\\|«»“”‘’…"
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_SEED = 42
MAX_PAIRS_PER_ROW = 8


@dataclass
class Shingles:
    """Flat shingle hashes of n rows: row i owns ``hashes[offsets[i]:offsets[i + 1]]`` (sorted, unique)."""

    hashes: np.ndarray  # uint64
    offsets: np.ndarray  # int64, n + 1

    def row(self, i: int) -> np.ndarray:
        return self.hashes[self.offsets[i] : self.offsets[i + 1]]

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)


def _rotl(x: np.ndarray, k: int) -> np.ndarray:
    return (x << np.uint64(k)) | (x >> np.uint64(64 - k))


def shingle(texts: pa.Array | pa.ChunkedArray | list[str], ngram: int = 3) -> Shingles:
    """Word n-grams of each text, hashed to uint64 (words: lower-cased, split on whitespace, punctuation
    trimmed from both ends). A text with fewer than ``ngram`` words has one shingle made of all its words;
    an empty text has none. Repeated shingles are kept (MinHash ignores them; ``jaccard`` dedups)."""
    arr = pa.array(texts, pa.large_string()) if isinstance(texts, list) else texts
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    words = pc.utf8_split_whitespace(pc.utf8_lower(arr.fill_null("")))
    parent = pc.list_parent_indices(words).to_numpy()
    flat = pc.utf8_trim(pc.list_flatten(words), _PUNCT)
    empty = pc.equal(pc.binary_length(flat), 0)
    if pc.any(empty).as_py():
        keep = pc.invert(empty)
        parent = parent[keep.to_numpy(zero_copy_only=False)]
        flat = flat.filter(keep)
    if len(flat) == 0:
        return Shingles(np.zeros(0, np.uint64), np.zeros(n + 1, np.int64))
    enc = pc.dictionary_encode(flat)
    vocab = enc.dictionary.to_numpy(zero_copy_only=False)
    word_hash = pd.util.hash_array(vocab.astype(object), categorize=False)[enc.indices.to_numpy()]
    counts = np.bincount(parent, minlength=n)
    k = ngram
    if k > 1 and len(word_hash) >= k:
        g = word_hash[: len(word_hash) - k + 1] * _M1
        for j in range(1, k):
            g = g ^ _rotl(word_hash[j : len(word_hash) - k + 1 + j] * _M2, (17 * j) % 63 + 1)
        same_row = parent[: len(parent) - k + 1] == parent[k - 1 :]
        grams, gparent = g[same_row], parent[: len(parent) - k + 1][same_row]
    elif k > 1:
        grams, gparent = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    else:
        grams, gparent = word_hash, parent
    # rows with 1..k-1 words: one shingle made of all their words
    short = np.flatnonzero((counts > 0) & (counts < k)) if k > 1 else np.zeros(0, np.int64)
    if len(short):
        starts = np.concatenate([[0], np.cumsum(counts)])[short]
        acc = np.zeros(len(short), np.uint64)
        for j in range(k - 1):
            has = counts[short] > j
            acc[has] = (acc[has] * _M1) ^ word_hash[starts[has] + j]
        grams = np.concatenate([grams, acc])
        gparent = np.concatenate([gparent, short])
        order = np.argsort(gparent, kind="stable")
        grams, gparent = grams[order], gparent[order]
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(gparent, minlength=n), out=offsets[1:])
    return Shingles(grams, offsets)


def _subset(sh: Shingles, rows: np.ndarray) -> Shingles:
    """The shingles of the given rows (positions), in that order."""
    sizes = sh.sizes[rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    # gather all ranges at once: position of each element = its row's start + rank inside the row
    starts = np.repeat(sh.offsets[:-1][rows] - offsets[:-1], sizes)
    return Shingles(sh.hashes[starts + np.arange(offsets[-1])], offsets)


def _shared_counts(sh: Shingles) -> np.ndarray:
    """Per row: how many of its shingles also occur elsewhere in the batch (an upper bound: hashes are
    truncated to make room for the row number, which can only add collisions).

    One plain sort of (hash | row) keys instead of an argsort or a hash table: much faster on large batches."""
    n = len(sh.offsets) - 1
    row_bits = max(1, int(n - 1).bit_length())
    rows = np.repeat(np.arange(n, dtype=np.uint64), sh.sizes)
    keys = np.sort(((sh.hashes >> np.uint64(row_bits)) << np.uint64(row_bits)) | rows)
    h = keys >> np.uint64(row_bits)
    same = h[1:] == h[:-1]
    dup = np.zeros(len(keys), bool)
    dup[1:] |= same
    dup[:-1] |= same
    owner = (keys & np.uint64((1 << row_bits) - 1)).astype(np.int64)
    return np.bincount(owner[dup], minlength=n)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    a, b = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def lsh_bands(threshold: float, num_perm: int) -> int:
    """Number of LSH bands (a divisor of num_perm) that best separates pairs above and below the threshold,
    weighting a missed duplicate four times a false candidate (candidates are verified exactly afterwards)."""
    xs = np.linspace(0, 1, 201)
    best, best_cost = 1, float("inf")
    for b in (d for d in range(1, num_perm + 1) if num_perm % d == 0):
        r = num_perm // b
        p = 1 - (1 - xs**r) ** b
        fp = np.trapezoid(np.where(xs < threshold, p, 0), xs)
        fn = np.trapezoid(np.where(xs >= threshold, 1 - p, 0), xs)
        cost = 0.2 * fp + 0.8 * fn
        if cost < best_cost:
            best, best_cost = b, cost
    return best


@dataclass
class NearDuplicates:
    """Rows (by position) that near-duplicate an earlier row: ``row[i]`` matches ``matched[i]`` (earlier)."""

    row: np.ndarray
    matched: np.ndarray
    similarity: np.ndarray
    candidates: int  # rows flagged by LSH (before exact verification)


def near_duplicates(
    sh: Shingles,
    threshold: float = 0.8,
    num_perm: int = 128,
    eligible_query: np.ndarray | None = None,
    eligible_match: np.ndarray | None = None,
) -> NearDuplicates:
    """Each row whose shingle set has Jaccard >= threshold with an earlier row (lower position).

    The earliest verified earlier row is reported. ``eligible_query`` / ``eligible_match`` (bool masks) restrict
    which rows may be reported as duplicates and which may be matched (e.g. only test rows against train rows).
    """
    import rensa

    n = len(sh.offsets) - 1
    empty = NearDuplicates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0)
    if n < 2 or len(sh.hashes) == 0:
        return empty
    bands = lsh_bands(threshold, num_perm)
    # Exact pre-filter: if J(A, B) >= t then at least a share t of A's shingles also occur in B, so a row whose
    # shingles are mostly unique in the whole batch cannot have a near-duplicate. Only the rest is sketched.
    sizes = sh.sizes
    n_shared = _shared_counts(sh)
    survivors = np.flatnonzero((sizes > 0) & (n_shared >= threshold * sizes - 1e-9))
    if len(survivors) < 2:
        return empty
    sub = _subset(sh, survivors)
    digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        sub.hashes, sub.offsets.astype(np.uint64), num_perm, _SEED
    )
    lsh = rensa.RMinHashLSH(threshold, num_perm, bands)
    flags = np.asarray(lsh.insert_matrix_and_query_duplicate_flags(digests), bool)
    flagged = survivors[flags]
    if len(flagged) < 2:
        return empty
    # signatures of the flagged rows only, banded here to learn which rows collide
    fl = _subset(sh, flagged)
    sig = np.array(
        rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            fl.hashes, fl.offsets.astype(np.uint64), num_perm, _SEED
        ).to_rows(),
        dtype=np.uint64,
    )
    r = num_perm // bands
    best = np.full(len(flagged), -1, np.int64)
    best_sim = np.zeros(len(flagged))
    mixers = (np.arange(1, r + 1, dtype=np.uint64) * _M1) | np.uint64(1)
    found = []
    for b in range(bands):
        key = (sig[:, b * r : (b + 1) * r] * mixers).sum(axis=1)
        order = np.argsort(key, kind="stable")  # equal keys stay in ascending row position
        ks = key[order]
        new_group = np.concatenate([[True], ks[1:] != ks[:-1]])
        start = np.maximum.accumulate(np.where(new_group, np.arange(len(ks)), 0))
        rank = np.arange(len(ks)) - start
        # each row against the first few earlier rows of its bucket (buckets of many copies stay cheap)
        for m in range(min(MAX_PAIRS_PER_ROW, int(rank.max(initial=0)))):
            sel = rank > m
            found.append(order[start[sel] + m] * len(flagged) + order[sel])
    codes = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    pairs = sorted(zip((codes % len(flagged)).tolist(), (codes // len(flagged)).tolist(), strict=True))
    for q, a in pairs:  # by query row, then earliest candidate first
        ra, rq = int(flagged[a]), int(flagged[q])
        if eligible_query is not None and not eligible_query[rq]:
            continue
        if eligible_match is not None and not eligible_match[ra]:
            continue
        if best[q] >= 0:
            continue  # an earlier verified match is already known
        sim = jaccard(sh.row(ra), sh.row(rq))
        if sim >= threshold:
            best[q], best_sim[q] = a, sim
    hit = best >= 0
    return NearDuplicates(
        row=flagged[hit], matched=flagged[best[hit]], similarity=best_sim[hit], candidates=len(flagged)
    )
