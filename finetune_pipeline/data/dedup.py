"""Near-duplicate detection: word n-gram shingles, MinHash signatures (rensa, Rust) and LSH banding.

Rows are judged on what distinguishes them. Each row has two sides, the prompt (every message but the final
answer) and the answer (the final assistant message), shingled separately. Shingles that occur in a large share
of the rows (``boilerplate_share``: a shared system prompt, retrieved context, schema or few-shot header) are
dropped before anything is compared, and a pair is a near-duplicate only when both sides reach the threshold.
One allowance: when the distinctive prompts are identical (the same question), the answers need only reach
``same_prompt_threshold`` (2t - 1: 0.6 at the default 0.8). A word appended to or replaced at the end of a short answer
changes one of its few 3-gram shingles on each side and drops its Jaccard below t (an 8-word answer with its last word
replaced: 5/7 = 0.71), yet the row is the same example edited; answers further apart than that under the same question
are label conflicts. Rows whose prompts reach the threshold while their answers do not are label conflicts, reported,
never removed here.

The whole batch is processed column-wise: shingles are hashed with Arrow and NumPy (no Python loop per row), an
exact pre-filter drops rows whose shingles are mostly unique, rensa computes all signatures in one call and flags
every row that shares an LSH band with another row. Only those flagged rows (a few percent in practice) are then
banded again here to find which earlier row each one matches, and every candidate pair is verified with the exact
Jaccard similarity of both sides, so a reported duplicate is never an LSH false positive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_PUNCT = "\"'.,;:!?()[]{}<>`*_~-/\\|«»“”‘’…"
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_SEED = 42
MAX_PAIRS_PER_ROW = 8
BOILERPLATE_MIN_ROWS = 3  # a shingle must occur in at least this many rows to count as boilerplate
_ANSWER_SALT = np.uint64(0x5BD1E9955BD1E995)
_EMPTY_PROMPT = np.uint64(0x243F6A8885A308D3)
_EMPTY_ANSWER = np.uint64(0x13198A2E03707344)


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


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 and len(b) == 0:
        return 1.0
    a, b = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def pair_jaccard(sh: Shingles, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``jaccard`` of entries ``left[i]`` and ``right[i]`` for every i at once: one sort of (pair, hash, side)
    triples, duplicates within an entry dropped, then per pair the hashes found on both sides."""
    m = len(left)
    if m == 0:
        return np.zeros(0)
    take = np.concatenate([left, right])
    sizes = sh.sizes[take]
    within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    h = sh.hashes[np.repeat(sh.offsets[:-1][take], sizes) + within]
    pair = np.repeat(np.tile(np.arange(m), 2), sizes)
    side = np.repeat(np.arange(2 * m) >= m, sizes)
    order = np.lexsort((side, h, pair))
    pair, h, side = pair[order], h[order], side[order]
    first = np.ones(len(h), bool)
    first[1:] = (pair[1:] != pair[:-1]) | (h[1:] != h[:-1]) | (side[1:] != side[:-1])
    pair, h, side = pair[first], h[first], side[first]
    n_left = np.bincount(pair[~side], minlength=m)
    n_right = np.bincount(pair[side], minlength=m)
    both = (pair[1:] == pair[:-1]) & (h[1:] == h[:-1])  # the same hash on the left, then on the right
    inter = np.bincount(pair[1:][both], minlength=m)
    union = n_left + n_right - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


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


def side_shingles(prompts: pa.Array | list[str], answers: pa.Array | list[str], ngram: int = 3) -> Shingles:
    """Shingles of each row's two sides, interleaved: entry ``2i`` is row i's prompt (every message but the final
    answer), entry ``2i + 1`` its final answer. Answer hashes are salted so that no shingle is shared across sides."""
    p = pa.array(prompts, pa.large_string()) if isinstance(prompts, list) else prompts
    a = pa.array(answers, pa.large_string()) if isinstance(answers, list) else answers
    n = len(p)
    both = pa.concat_arrays([p.cast(pa.large_string()), a.cast(pa.large_string())])
    sh = shingle(both, ngram)
    sh.hashes[sh.offsets[n] :] ^= _ANSWER_SALT
    order = np.empty(2 * n, np.int64)
    order[0::2], order[1::2] = np.arange(n), np.arange(n) + n
    return _subset(sh, order)


def side_subset(sides: Shingles, rows: np.ndarray) -> Shingles:
    """The two side entries of the given rows (positions), in that order."""
    rows = np.asarray(rows, np.int64)
    entries = np.empty(2 * len(rows), np.int64)
    entries[0::2], entries[1::2] = 2 * rows, 2 * rows + 1
    return _subset(sides, entries)


def _rows_of(sides: Shingles) -> Shingles:
    """Merge each row's two side entries into one shingle set (prompt and answer hashes never collide)."""
    return Shingles(sides.hashes, sides.offsets[::2].copy())


def _side(sides: Shingles, which: int) -> Shingles:
    """One side (0 prompt, 1 answer) of every row."""
    n = (len(sides.offsets) - 1) // 2
    return _subset(sides, np.arange(n) * 2 + which)


@dataclass
class SideStats:
    """Per side entry, over distinct shingles that are not boilerplate: how many it has and how many of them also
    occur in another entry; and the boilerplate shingles (hashes truncated by ``row_bits``)."""

    sizes: np.ndarray
    shared: np.ndarray
    boilerplate: np.ndarray
    row_bits: int


def side_stats(sides: Shingles, share: float, min_rows: int = BOILERPLATE_MIN_ROWS) -> SideStats:
    """One plain sort of (hash | entry) keys gives every shingle's document frequency, hence the boilerplate
    (shingles in more than ``share`` of the rows and in at least ``min_rows`` rows) and the exact pre-filter's
    counts. A shingle repeated inside one entry counts twice (an upper bound, like the hash truncation that makes
    room for the entry number: both can only add candidates, never lose one)."""
    n_entries = len(sides.offsets) - 1
    row_bits = max(1, int(n_entries - 1).bit_length())
    entry = np.repeat(np.arange(n_entries, dtype=np.uint64), sides.sizes)
    keys = np.sort(((sides.hashes >> np.uint64(row_bits)) << np.uint64(row_bits)) | entry)
    h = keys >> np.uint64(row_bits)
    owner = (keys & np.uint64((1 << row_bits) - 1)).view(np.int64)  # small values: a view, no copy
    same = h[1:] == h[:-1]
    dup = np.zeros(len(keys), bool)
    dup[1:] |= same
    dup[:-1] |= same
    cutoff = max(share * (n_entries // 2), min_rows - 1) if share < 1 else np.inf
    # a shingle in more than `cutoff` entries is a run of at least c + 1 equal sorted hashes: h[i] == h[i + c]
    c = int(np.floor(cutoff)) if np.isfinite(cutoff) else len(h)
    if c >= len(h) or not (h[c:] == h[: len(h) - c]).any():  # the usual case: no boilerplate, no groups needed
        return SideStats(sides.sizes, np.bincount(owner[dup], minlength=n_entries), np.zeros(0, np.uint64), row_bits)
    start = np.flatnonzero(np.concatenate([[True], ~same]))
    df = np.diff(np.append(start, len(keys)))
    boiler_group = df > cutoff
    keep = ~np.repeat(boiler_group, df)
    return SideStats(
        sizes=np.bincount(owner[keep], minlength=n_entries),
        shared=np.bincount(owner[keep & dup], minlength=n_entries),
        boilerplate=h[start][boiler_group] << np.uint64(row_bits),
        row_bits=row_bits,
    )


def remove_boilerplate(sides: Shingles, stats: SideStats) -> Shingles:
    """Drop the boilerplate shingles: a shared system prompt, retrieved context, schema or few-shot header says
    nothing about what distinguishes a row."""
    if len(stats.boilerplate) == 0:
        return sides
    bits = np.uint64(stats.row_bits)
    keep = ~pd.Series((sides.hashes >> bits) << bits).isin(stats.boilerplate).to_numpy()  # hash table: no sort
    entry = np.repeat(np.arange(len(sides.offsets) - 1), sides.sizes)[keep]
    offsets = np.zeros(len(sides.offsets), np.int64)
    np.cumsum(np.bincount(entry, minlength=len(sides.offsets) - 1), out=offsets[1:])
    return Shingles(sides.hashes[keep], offsets)


def _with_sentinels(sides: Shingles, stats: SideStats) -> Shingles:
    """Give every empty side one sentinel shingle, so that two rows with nothing distinctive on a side (no prompt,
    or a prompt made only of boilerplate) compare as equal on that side; ``stats`` counts updated in place."""
    sizes = sides.sizes
    empty = np.flatnonzero(sizes == 0)
    if len(empty) == 0:
        return sides
    side = empty % 2
    values = np.where(side == 0, _EMPTY_PROMPT, _EMPTY_ANSWER).astype(np.uint64)
    hashes = np.insert(sides.hashes, sides.offsets[empty], values)
    add = np.zeros(len(sizes), np.int64)
    add[empty] = 1
    offsets = np.zeros(len(sides.offsets), np.int64)
    np.cumsum(sizes + add, out=offsets[1:])
    stats.sizes = stats.sizes + add
    many = np.bincount(side, minlength=2) >= 2
    stats.shared = stats.shared + add * many[np.arange(len(sizes)) % 2]
    return Shingles(hashes, offsets)


def _bucket_pairs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (earlier, later) of entries with equal keys: each entry against the first few earlier entries of its
    bucket (``MAX_PAIRS_PER_ROW``; buckets of many copies stay cheap), earliest first."""
    order = np.argsort(key, kind="stable")  # equal keys stay in ascending position
    ks = key[order]
    new_group = np.concatenate([[True], ks[1:] != ks[:-1]])
    start = np.maximum.accumulate(np.where(new_group, np.arange(len(ks)), 0))
    rank = np.arange(len(ks)) - start
    earlier, later = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for m in range(min(MAX_PAIRS_PER_ROW, int(rank.max(initial=0)))):
        sel = rank > m
        earlier.append(order[start[sel] + m])
        later.append(order[sel])
    return np.concatenate(earlier), np.concatenate(later)


def _candidate_pairs(
    sh: Shingles, rows: np.ndarray, threshold: float, num_perm: int, sizes: np.ndarray, shared: np.ndarray
) -> np.ndarray:
    """Pairs (earlier, later) of positions in ``sh`` whose shingle sets may reach the threshold: the exact
    pre-filter, then rensa MinHash LSH over the survivors, then the flagged rows banded again here.

    Pre-filter: if J(A, B) >= t then at least a share t of A's shingles also occur in B, so a row whose shingles are
    mostly unique in the batch cannot have a near-duplicate. Only the rest is sketched."""
    import rensa

    none = np.zeros((0, 2), np.int64)
    if len(rows) < 2:
        return none
    sub = sh if len(rows) == len(sh.offsets) - 1 else _subset(sh, rows)
    sizes, n_shared = sizes[rows], shared[rows]
    survivors = np.flatnonzero((sizes > 0) & (n_shared >= threshold * sizes - 1e-9))
    if len(survivors) < 2:
        return none
    sv = _subset(sub, survivors)
    bands = lsh_bands(threshold, num_perm)
    digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
        sv.hashes, sv.offsets.astype(np.uint64), num_perm, _SEED
    )
    lsh = rensa.RMinHashLSH(threshold, num_perm, bands)
    flags = np.asarray(lsh.insert_matrix_and_query_duplicate_flags(digests), bool)
    flagged = survivors[flags]
    if len(flagged) < 2:
        return none
    fl = _subset(sub, flagged)
    sig = np.array(
        rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            fl.hashes, fl.offsets.astype(np.uint64), num_perm, _SEED
        ).to_rows(),
        dtype=np.uint64,
    )
    r = num_perm // bands
    mixers = (np.arange(1, r + 1, dtype=np.uint64) * _M1) | np.uint64(1)
    found = []
    for b in range(bands):
        earlier, later = _bucket_pairs((sig[:, b * r : (b + 1) * r] * mixers).sum(axis=1))
        found.append(earlier * len(flagged) + later)
    codes = np.unique(np.concatenate(found))
    if len(codes) == 0:
        return none
    pos = rows[flagged]
    return np.stack([pos[codes // len(flagged)], pos[codes % len(flagged)]], axis=1)


@dataclass
class NearDuplicates:
    """Rows (by position) that near-duplicate an earlier row on both sides: ``row[i]`` matches ``matched[i]``.

    ``conflicts``: rows whose prompt equals or near-equals an earlier row's prompt while the answers differ (label
    conflicts, not duplicates), one pair per later row; nothing is removed for them here."""

    row: np.ndarray
    matched: np.ndarray
    similarity: np.ndarray  # the lower of the two sides' similarities
    candidates: int  # candidate pairs from LSH (before exact verification)
    prompt_similarity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    answer_similarity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    conflicts: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CONFLICT_FIELDS))
    boilerplate_shingles: int = 0


CONFLICT_FIELDS = ["row", "matched", "prompt_similarity", "answer_similarity"]


def same_prompt_threshold(threshold: float) -> float:
    """Answer similarity that makes two rows with identical distinctive prompts near-duplicates (2t - 1)."""
    return max(0.0, 2 * threshold - 1)


def _same_prompt_pairs(distinct: Shingles, informative: np.ndarray) -> np.ndarray:
    """Pairs (earlier, later) of rows whose distinctive prompt shingles are identical, keyed by an order-free sum of
    their mixed hashes (verified exactly afterwards). LSH on whole rows can miss such a pair when its answers differ
    more than its prompts; the same-prompt allowance and the conflicts need every one of them."""
    none = np.zeros((0, 2), np.int64)
    rows = np.flatnonzero(informative)
    if len(rows) < 2:
        return none
    key = np.add.reduceat(distinct.hashes * _M2, distinct.offsets[:-1])[0::2][rows]  # every entry is non-empty
    repeated = pd.Series(key).duplicated(keep=False).to_numpy()  # a hash table: the usual case sorts nothing
    if not repeated.any():
        return none
    rows = rows[repeated]
    earlier, later = _bucket_pairs(key[repeated])
    return np.stack([rows[earlier], rows[later]], axis=1)


def near_duplicates(
    sides: Shingles,
    threshold: float = 0.8,
    num_perm: int = 128,
    eligible_query: np.ndarray | None = None,
    eligible_match: np.ndarray | None = None,
    *,
    boilerplate_share: float = 0.3,
    conflicts: bool = False,
) -> NearDuplicates:
    """Each row whose prompt side AND answer side both have Jaccard >= threshold with an earlier row's, after
    shingles shared by more than ``boilerplate_share`` of the rows are ignored (``sides``: ``side_shingles``); with
    identical distinctive prompts the answers need ``same_prompt_threshold(threshold)`` (see the module's text).

    The earliest verified earlier row is reported. ``eligible_query`` / ``eligible_match`` (bool masks over rows)
    restrict which rows may be reported and which may be matched (e.g. only test rows against train rows). With
    ``conflicts``, rows whose (distinctive) prompt reaches the threshold but whose answer does not are reported too.
    """
    n = (len(sides.offsets) - 1) // 2
    out = NearDuplicates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0)
    if n < 2 or len(sides.hashes) == 0:
        return out
    stats = side_stats(sides, boilerplate_share)
    distinct = remove_boilerplate(sides, stats)
    informative = stats.sizes[0::2] > 0  # rows with a distinctive prompt (conflicts need one)
    distinct = _with_sentinels(distinct, stats)
    row_sizes, row_shared = stats.sizes[0::2] + stats.sizes[1::2], stats.shared[0::2] + stats.shared[1::2]
    pairs = [
        _candidate_pairs(_rows_of(distinct), np.arange(n), threshold, num_perm, row_sizes, row_shared),
        _same_prompt_pairs(distinct, informative),
    ]
    if conflicts:
        prompts = _side(distinct, 0)
        pairs.append(
            _candidate_pairs(
                prompts, np.flatnonzero(informative), threshold, num_perm, stats.sizes[0::2], stats.shared[0::2]
            )
        )
    cand = np.concatenate(pairs)
    if len(cand):
        cand = np.unique(cand, axis=0)
        cand = cand[np.lexsort((cand[:, 0], cand[:, 1]))]  # by later row, then earliest candidate first
    if eligible_query is not None:
        cand = cand[eligible_query[cand[:, 1]]]
    if eligible_match is not None:
        cand = cand[eligible_match[cand[:, 0]]]
    # verify every candidate at once; candidates are ordered by later row, then earliest match first
    earlier, later = (cand[:, 0], cand[:, 1]) if len(cand) else (np.zeros(0, np.int64),) * 2
    sp = pair_jaccard(distinct, 2 * earlier, 2 * later)
    close = sp >= threshold
    earlier, later, sp = earlier[close], later[close], sp[close]
    sa = pair_jaccard(distinct, 2 * earlier + 1, 2 * later + 1)
    return decide(earlier, later, sp, sa, informative, threshold, len(cand), len(stats.boilerplate), conflicts)


def decide(
    earlier: np.ndarray,
    later: np.ndarray,
    sp: np.ndarray,
    sa: np.ndarray,
    informative: np.ndarray,
    threshold: float,
    candidates: int,
    boilerplate_shingles: int,
    conflicts: bool = False,
) -> NearDuplicates:
    """The rule on verified pairs (``earlier``, ``later``; ordered by later row, then earliest match first) whose
    prompt similarity ``sp`` reached the threshold, with answer similarity ``sa``: a duplicate when the answers reach
    it too, or the distinctive prompts are identical and the answers reach ``same_prompt_threshold``; each later row
    reports its earliest such match. With ``conflicts``, the rest of those pairs are label conflicts."""
    both_informative = informative[earlier] & informative[later]
    dup = (sa >= threshold) | ((sp == 1.0) & both_informative & (sa >= same_prompt_threshold(threshold)))
    hit, at = np.unique(later[dup], return_index=True)  # the earliest verified match of each row
    pick = np.flatnonzero(dup)[at]
    conf = pd.DataFrame(columns=CONFLICT_FIELDS)
    if conflicts:
        rest = np.flatnonzero(~dup & both_informative & ~np.isin(later, hit))
        q, at = np.unique(later[rest], return_index=True)
        c = rest[at]
        conf = pd.DataFrame(
            {"row": q, "matched": earlier[c], "prompt_similarity": sp[c].round(4), "answer_similarity": sa[c].round(4)}
        )
    sims = np.stack([sp[pick], sa[pick]], axis=1)
    return NearDuplicates(
        row=hit,
        matched=earlier[pick],
        similarity=sims.min(axis=1) if len(hit) else np.zeros(0),
        candidates=candidates,
        prompt_similarity=sims[:, 0],
        answer_similarity=sims[:, 1],
        conflicts=conf,
        boilerplate_shingles=boilerplate_shingles,
    )
