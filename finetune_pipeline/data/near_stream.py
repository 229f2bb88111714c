"""Near-duplicate detection over a drop that arrives in chunks, in memory that grows with a row's signature rather
than with its text (``dedup.near_duplicates`` holds every row's shingles at once).

The rule is the same as ``dedup.near_duplicates`` (both sides reach the threshold after the boilerplate is ignored;
with identical distinctive prompts the answers need ``same_prompt_threshold``; the earliest verified earlier row is
reported). What differs is where things live:

- the boilerplate (shingles in more than ``boilerplate_share`` of the rows) is decided on the first rows, held as
  shingles until ``sample_shingles`` of them have arrived (a drop smaller than that: all of its rows, so the result
  equals the whole-drop computation);
- from then on each chunk keeps only, per row, its MinHash signature (``num_perm`` x 4 bytes), the key of its
  distinctive prompt and whether it has one;
- at the end every row is banded (LSH) and the candidate pairs are verified with the exact Jaccard similarity of
  both sides, from the texts of the candidate rows only, which ``finish`` asks for (``texts_of``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from finetune_pipeline.data import dedup

SAMPLE_SHINGLES = 4_000_000  # shingles held to decide the boilerplate (8 bytes each, plus the sort: ~100 MB)
VERIFY_PAIRS = 5_000  # candidate pairs verified at a time
TextsOf = Callable[[np.ndarray], tuple[pa.Array, pa.Array]]  # row positions -> (prompts, final answers)


class NearDedupStream:
    """Feed the live rows of each chunk in order (``add``), then ``finish``."""

    def __init__(
        self,
        threshold: float,
        num_perm: int,
        ngram: int,
        boilerplate_share: float,
        sample_shingles: int | None = None,
    ):
        self.threshold, self.num_perm, self.ngram, self.share = threshold, num_perm, ngram, boilerplate_share
        self.sample_shingles = sample_shingles or SAMPLE_SHINGLES
        self.rows = 0
        self._sample: list[dedup.Shingles] = []
        self._sampled = 0
        self.stats: dedup.SideStats | None = None
        self._sig: list[np.ndarray] = []
        self._prompt_key: list[np.ndarray] = []
        self._informative: list[np.ndarray] = []

    def add(self, prompts: pa.Array, answers: pa.Array) -> None:
        """The live rows of one chunk (their prompts and final answers), after the rows before them."""
        if not len(prompts):
            return
        sides = dedup.side_shingles(prompts, answers, self.ngram)
        self.rows += len(prompts)
        if self.stats is not None:
            self._keep(sides)
            return
        self._sample.append(sides)
        self._sampled += len(sides.hashes)
        if self._sampled >= self.sample_shingles:
            self._settle()

    def _settle(self) -> None:
        """Decide the boilerplate on the rows held so far, then keep their signatures and drop their shingles."""
        sample = _concat(self._sample)
        self._sample, self._sampled = [], 0
        self.stats = dedup.side_stats(sample, self.share)
        self._keep(sample)

    def _distinct(self, sides: dedup.Shingles) -> tuple[dedup.Shingles, np.ndarray]:
        """Shingles without the boilerplate, each empty side given its sentinel, and which rows keep a prompt."""
        assert self.stats is not None
        distinct = dedup.remove_boilerplate(sides, self.stats)
        informative = distinct.sizes[0::2] > 0
        scratch = dedup.SideStats(distinct.sizes, np.zeros(len(distinct.sizes), np.int64), self.stats.boilerplate, 0)
        return dedup._with_sentinels(distinct, scratch), informative

    def _keep(self, sides: dedup.Shingles) -> None:
        import rensa

        distinct, informative = self._distinct(sides)
        rows = dedup._rows_of(distinct)
        digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(
            rows.hashes, rows.offsets.astype(np.uint64), self.num_perm, dedup._SEED
        )
        self._sig.append(np.array(digests.to_rows(), dtype=np.uint32).reshape(-1, self.num_perm))
        self._prompt_key.append(np.add.reduceat(distinct.hashes * dedup._M2, distinct.offsets[:-1])[0::2])
        self._informative.append(informative)

    def finish(self, texts_of: TextsOf) -> dedup.NearDuplicates:
        """Every row's near-duplicate (positions in the order the rows were added), verified exactly."""
        out = dedup.NearDuplicates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0)
        if self.stats is None and self._sample:
            self._settle()
        if self.rows < 2 or self.stats is None:
            return out
        sig = np.concatenate(self._sig)
        key = np.concatenate(self._prompt_key)
        informative = np.concatenate(self._informative)
        self._sig, self._prompt_key = [], []
        cand = np.concatenate([self._band_pairs(sig), _same_key_pairs(key, informative)])
        del sig
        if not len(cand):
            return out
        cand = np.unique(cand, axis=0)
        cand = cand[np.lexsort((cand[:, 0], cand[:, 1]))]  # by later row, then earliest candidate first
        earlier, later, sp, sa = self._verify(cand, texts_of)
        return dedup.decide(earlier, later, sp, sa, informative, self.threshold, len(cand), len(self.stats.boilerplate))

    def _verify(self, cand: np.ndarray, texts_of: TextsOf) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The candidate pairs whose prompts reach the threshold, with both sides' exact Jaccard similarity,
        ``VERIFY_PAIRS`` pairs at a time (the texts of one block's rows in memory), in the candidates' order."""
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for lo in range(0, len(cand), VERIFY_PAIRS):
            block = cand[lo : lo + VERIFY_PAIRS]
            involved, at = np.unique(block.ravel(), return_inverse=True)
            prompts, answers = texts_of(involved)
            distinct, _ = self._distinct(dedup.side_shingles(prompts, answers, self.ngram))
            local = at.reshape(-1, 2)
            sp = dedup.pair_jaccard(distinct, 2 * local[:, 0], 2 * local[:, 1])
            close = sp >= self.threshold
            sa = dedup.pair_jaccard(distinct, 2 * local[close, 0] + 1, 2 * local[close, 1] + 1)
            out.append((block[close], sp[close], sa))
        pairs = np.concatenate([o[0] for o in out])
        return pairs[:, 0], pairs[:, 1], np.concatenate([o[1] for o in out]), np.concatenate([o[2] for o in out])

    def _band_pairs(self, sig: np.ndarray) -> np.ndarray:
        """Pairs (earlier, later) that share an LSH band of their signatures."""
        bands = dedup.lsh_bands(self.threshold, self.num_perm)
        r = self.num_perm // bands
        mixers = (np.arange(1, r + 1, dtype=np.uint64) * dedup._M1) | np.uint64(1)
        found = [np.zeros((0, 2), np.int64)]
        for b in range(bands):
            band = sig[:, b * r : (b + 1) * r].astype(np.uint64)
            earlier, later = dedup._bucket_pairs((band * mixers).sum(axis=1))
            found.append(np.stack([earlier, later], axis=1))
        return np.concatenate(found)


def _same_key_pairs(key: np.ndarray, informative: np.ndarray) -> np.ndarray:
    """Pairs (earlier, later) of rows with the same distinctive prompt (verified exactly afterwards)."""
    import pandas as pd

    rows = np.flatnonzero(informative)
    if len(rows) < 2:
        return np.zeros((0, 2), np.int64)
    k = key[rows]
    repeated = pd.Series(k).duplicated(keep=False).to_numpy()
    if not repeated.any():
        return np.zeros((0, 2), np.int64)
    rows = rows[repeated]
    earlier, later = dedup._bucket_pairs(k[repeated])
    return np.stack([rows[earlier], rows[later]], axis=1)


def _concat(parts: list[dedup.Shingles]) -> dedup.Shingles:
    if len(parts) == 1:
        return parts[0]
    hashes = np.concatenate([p.hashes for p in parts])
    sizes = np.concatenate([p.sizes for p in parts])
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return dedup.Shingles(hashes, offsets)
