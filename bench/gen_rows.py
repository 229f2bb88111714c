"""Deterministic benchmark corpus: N chat rows as JSONL (~200 bytes a row) with planted exact and near duplicates.

Near duplicates are copies of an earlier row with one small edit (a word appended to the answer, its last word
replaced, or the question's first word dropped), so their word-3-gram Jaccard similarity is high but below 1. The ground truth (which row each planted copy came from) is written
next to the data so that recall and precision can be measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "tu",
    "ra",
    "si",
    "po",
    "de",
    "fa",
    "gu",
    "he",
    "ji",
    "mo",
    "nu",
    "pe",
    "qui",
    "ro",
    "sa",
    "ti",
    "va",
    "we",
    "xo",
    "yu",
    "ze",
    "bri",
    "cla",
    "dro",
    "fle",
    "gri",
]


def vocabulary(n: int, rng: np.random.Generator) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(2, 4))
        words.add("".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k)))
    return sorted(words)


def generate(out: Path, n_rows: int, exact_rate: float = 0.05, near_rate: float = 0.02, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    vocab = np.array(vocabulary(5000, rng))
    kinds = rng.random(n_rows)
    truth_near: list[tuple[int, int]] = []
    truth_exact: list[tuple[int, int]] = []
    q_len = rng.integers(7, 12, n_rows)
    a_len = rng.integers(8, 13, n_rows)
    words = rng.integers(0, len(vocab), (n_rows, 34))
    texts: list[tuple[str, str]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for i in range(n_rows):
            if i > 100 and kinds[i] < exact_rate:
                src = int(rng.integers(0, i))
                q, a = texts[src]
                truth_exact.append((i, src))
            elif i > 100 and kinds[i] < exact_rate + near_rate:
                src = int(rng.integers(0, i))
                q, a = texts[src]
                new = str(vocab[int(rng.integers(0, len(vocab)))])
                edit = int(rng.integers(0, 3))
                if edit == 0:  # one word more at the end of the answer
                    a = a[:-1] + " " + new + "."
                elif edit == 1:  # the answer's last word replaced
                    a = a.rsplit(" ", 1)[0] + " " + new + "."
                else:  # the question's first word dropped
                    q = q.split(" ", 1)[1]
                truth_near.append((i, src))
            else:
                w = words[i]
                q = " ".join(vocab[w[: q_len[i]]]) + "?"
                a = " ".join(vocab[w[16 : 16 + a_len[i]]]) + "."
            texts.append((q, a))
            f.write(
                json.dumps(
                    {"id": f"r{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                )
                + "\n"
            )
    truth = {"rows": n_rows, "exact": truth_exact, "near": truth_near}
    out.with_suffix(".truth.json").write_text(json.dumps(truth))
    return truth


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, default=None, help="default: .finetune/bench/rows_N.jsonl")
    args = ap.parse_args()
    args.out = args.out or Path(f".finetune/bench/rows_{args.rows}.jsonl")
    t = generate(args.out, args.rows)
    print(
        f"{args.out}: {t['rows']} rows, {len(t['exact'])} exact, {len(t['near'])} near duplicates, "
        f"{args.out.stat().st_size / 1e6:.0f} MB"
    )
