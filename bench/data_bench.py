"""Data-layer benchmark: 1M generated chat rows (JSONL, ~240 MB, planted exact and near duplicates).

Measured in one run, each against its baseline:
  (a) parse + exact dedup: the guides' per-row loop (json.loads, md5 dedup, length filter) vs clean_file's
      parse + normalise + exact-dedup stages (which also validate and normalise every row);
  (b) near dedup: datasketch MinHash + MinHashLSH row by row (128 permutations, word 3-grams, whole row) vs
      finetune_pipeline.data.dedup (prompt and answer sides, boilerplate excluded, rensa signatures, exact
      pre-filter, verified candidates), per row, with precision and recall on the planted near-duplicates of the
      same sample, per kind of planted edit; a planted copy whose answer's last word was replaced has the same
      prompt and another answer: when that answer is short it is reported as a label conflict (kept), not removed;
  (c) end to end (parse, clean, exact + near dedup, split with the leak check, write Parquet) for all rows, in a
      fresh process, with its peak memory (ru_maxrss).

Usage: python bench/data_bench.py [--rows 1000000] [--sample 20000]   (results: .finetune/bench/data_bench.json)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_rows import generate  # noqa: E402

OUT = Path(".finetune/bench")
THRESHOLD = 0.8


def bench_spec():  # type: ignore[no-untyped-def]
    from finetune_pipeline.spec import PipelineSpec

    return PipelineSpec.model_validate(
        {
            "name": "bench",
            "source": {"incoming_dir": str(OUT), "file_format": "jsonl", "record_format": "chat"},
            "cleaning": {"max_total_chars": 20_000},
            "dedup": {"near": True, "near_threshold": THRESHOLD},
            "registry": {"model_name": "bench"},
        }
    )


def baseline_loop(path: Path, max_chars: int = 20_000) -> tuple[float, int]:
    """The guides' loop: json.loads per line, md5 of the text for exact dedup, a length filter."""
    t = time.perf_counter()
    seen: set[str] = set()
    kept = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            text = "\n".join(m["content"] for m in r["messages"])
            h = hashlib.md5(text.encode()).hexdigest()
            if h in seen:
                continue
            seen.add(h)
            if len(text) <= max_chars:
                kept.append(r)
    return time.perf_counter() - t, len(kept)


def sample_texts(path: Path, n: int) -> list[tuple[str, str]]:
    """(prompt, answer) of the first n rows."""
    out = []
    with path.open() as f:
        for i, line in enumerate(f):
            if i >= n:
                break
            m = json.loads(line)["messages"]
            out.append(("\n".join(x["content"] for x in m[:-1]), m[-1]["content"]))
    return out


def edit_kind(copy: tuple[str, str], src: tuple[str, str]) -> str:
    """Which edit gen_rows planted (it does not record it): read back from the two rows."""
    if copy[0] != src[0]:
        return "question_first_word_dropped"
    return "answer_word_appended" if len(copy[1].split()) > len(src[1].split()) else "answer_last_word_replaced"


def _exact_first(texts: list[str]) -> np.ndarray:
    """Positions of the first occurrence of each text (near dedup runs after exact dedup in both methods)."""
    seen: set[str] = set()
    keep = []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            keep.append(i)
    return np.array(keep)


def datasketch_near(texts: list[str]) -> tuple[float, set[int]]:
    from datasketch import MinHash, MinHashLSH

    t = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    dups: set[int] = set()
    for i, text in enumerate(texts):
        w = text.lower().split()
        m = MinHash(num_perm=128)
        for g in {" ".join(w[j : j + 3]) for j in range(max(1, len(w) - 2))}:
            m.update(g.encode())
        if lsh.query(m):
            dups.add(i)
        else:
            lsh.insert(str(i), m)
    return time.perf_counter() - t, dups


def ours_near(pairs: list[tuple[str, str]], conflicts: bool = False) -> tuple[float, set[int], set[int]]:
    from finetune_pipeline.data import dedup

    t = time.perf_counter()
    sides = dedup.side_shingles([p for p, _ in pairs], [a for _, a in pairs], 3)
    nd = dedup.near_duplicates(sides, THRESHOLD, 128, conflicts=conflicts)
    return time.perf_counter() - t, set(nd.row.tolist()), set(nd.conflicts["row"].tolist())


def precision_recall(found: set[int], planted: set[int]) -> dict[str, float]:
    tp = len(found & planted)
    return {
        "found": len(found),
        "planted": len(planted),
        "precision": round(tp / len(found), 4) if found else 1.0,
        "recall": round(tp / len(planted), 4) if planted else 1.0,
    }


def end_to_end(path: Path) -> dict:
    """Run in a fresh process (see main) so that ru_maxrss is this pipeline's peak alone."""
    import pandas as pd

    from finetune_pipeline.data.clean import clean_file, write_parquet_atomic
    from finetune_pipeline.data.split import SPLITS, build_splits

    spec = bench_spec()
    t0 = time.perf_counter()
    res = clean_file(path, "bench", spec)
    t1 = time.perf_counter()
    out = OUT / "e2e"
    write_parquet_atomic(res.kept, out / "cleaned.parquet")
    write_parquet_atomic(res.quarantine, out / "quarantine.parquet")
    write_parquet_atomic(res.duplicates, out / "duplicates.parquet")
    t2 = time.perf_counter()
    sres = build_splits([res.kept], spec.split, ["bench"], spec.dedup)
    t3 = time.perf_counter()
    for s in SPLITS:
        write_parquet_atomic(sres.frames[s], out / f"{s}.parquet")
    t4 = time.perf_counter()
    del pd
    return {
        "rows_in": res.rows_in,
        "kept": len(res.kept),
        "exact_duplicates": len(res.duplicates) - res.near_duplicates,
        "near_duplicates": res.near_duplicates,
        "split_rows": {s: len(sres.frames[s]) for s in SPLITS},
        "test_train_leaks": len(sres.leaks),
        "cross_drop_conflicts": len(getattr(sres, "conflicts", [])),
        "stages_s": {
            **{k: round(v, 2) for k, v in res.timings.items()},
            "write_cleaned": round(t2 - t1, 2),
            "split_and_leak_check": round(t3 - t2, 2),
            "write_splits": round(t4 - t3, 2),
        },
        "clean_s": round(t1 - t0, 2),
        "total_s": round(t4 - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--sample", type=int, default=20_000, help="rows for the datasketch comparison")
    ap.add_argument("--e2e-only", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.e2e_only:
        print(json.dumps(end_to_end(args.e2e_only)))
        return
    path = OUT / f"rows_{args.rows}.jsonl"
    if not path.exists() or not path.with_suffix(".truth.json").exists():
        print(f"generating {args.rows} rows -> {path}")
        generate(path, args.rows)
    truth = json.loads(path.with_suffix(".truth.json").read_text())
    size_mb = path.stat().st_size / 1e6
    print(f"{path}: {args.rows} rows, {size_mb:.0f} MB")

    e2e = json.loads(
        subprocess.run(
            [sys.executable, __file__, "--e2e-only", str(path)], check=True, capture_output=True, text=True
        ).stdout.splitlines()[-1]
    )
    base_s, base_kept = baseline_loop(path)
    st = e2e["stages_s"]
    ours_a = st["parse"] + st["normalise"] + st["exact_dedup"]
    a = {
        "baseline_loop_s": round(base_s, 2),
        "baseline_kept": base_kept,
        "ours_parse_normalise_exact_s": round(ours_a, 2),
        "speedup": round(base_s / ours_a, 2),
    }

    pairs = sample_texts(path, args.sample)
    texts = [f"{p}\n{a}" for p, a in pairs]
    first = _exact_first(texts)
    uniq = [texts[i] for i in first]
    uniq_pairs = [pairs[i] for i in first]
    firsts = set(first.tolist())
    kind = {
        int(np.searchsorted(first, i)): edit_kind(pairs[i], pairs[src])
        for i, src in truth["near"]
        if i < args.sample and i in firsts
    }
    planted = set(kind)
    ds_s, ds_found = datasketch_near(uniq)
    our_s, our_found, _ = ours_near(uniq_pairs)
    _, our_found_c, our_conflicts = ours_near(uniq_pairs, conflicts=True)
    by_kind = {
        k: {
            "planted": sum(1 for v in kind.values() if v == k),
            "near_duplicate": sum(1 for i, v in kind.items() if v == k and i in our_found_c),
            "conflict": sum(1 for i, v in kind.items() if v == k and i in our_conflicts),
        }
        for k in sorted(set(kind.values()))
    }
    per_row_full_us = st["near_dedup"] / max(1, e2e["kept"] + e2e["near_duplicates"]) * 1e6
    b = {
        "sample_rows": len(uniq),
        "datasketch_us_per_row": round(ds_s / len(uniq) * 1e6, 1),
        "ours_us_per_row_sample": round(our_s / len(uniq) * 1e6, 1),
        "ours_us_per_row_full": round(per_row_full_us, 1),
        "speedup_sample": round(ds_s / our_s, 1),
        "speedup_vs_full_run": round((ds_s / len(uniq) * 1e6) / per_row_full_us, 1),
        "datasketch": precision_recall(ds_found, planted),
        "ours": precision_recall(our_found, planted),
        "ours_near_or_conflict": precision_recall(our_found_c | our_conflicts, planted),
        "ours_by_planted_edit": by_kind,
    }
    planted_full = len(truth["near"])
    c = {**e2e, "planted_near_in_file": planted_full, "file_mb": round(size_mb)}
    result = {"rows": args.rows, "a_parse_exact_dedup": a, "b_near_dedup": b, "c_end_to_end": c}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
