"""Run bench/data_bench.py from two checkouts (before: a baseline worktree, after: this one) back to back on the
same generated file, and print their figures side by side with the after/before ratio.

Usage: python bench/compare_data_bench.py BASELINE_WORKTREE [--rows 200000] [--sample 20000]
Both runs use this machine in one go, so their timings are comparable (ratios only, never absolute figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def run(tree: Path, rows: int, sample: int, data: Path) -> dict:
    bench = tree / ".finetune" / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    for suffix in (".jsonl", ".truth.json"):
        target = bench / f"rows_{rows}{suffix}"
        if not target.exists():
            shutil.copyfile(data.with_suffix(suffix), target)
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "bench/data_bench.py", "--rows", str(rows), "--sample", str(sample)]
    subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads((bench / "data_bench.json").read_text())


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline", type=Path)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--sample", type=int, default=20_000)
    args = ap.parse_args()
    sys.path.insert(0, str(HERE / "bench"))
    from gen_rows import generate

    data = HERE / ".finetune" / "bench" / f"rows_{args.rows}.jsonl"
    if not data.exists() or not data.with_suffix(".truth.json").exists():
        generate(data, args.rows)
    before = flat(run(args.baseline.resolve(), args.rows, args.sample, data))
    after = flat(run(HERE, args.rows, args.sample, data))
    rows = []
    for k in sorted(set(before) | set(after)):
        b, a = before.get(k, ""), after.get(k, "")
        ratio = round(a / b, 3) if isinstance(a, int | float) and isinstance(b, int | float) and b else ""
        rows.append((k, b, a, ratio))
    width = max(len(k) for k, *_ in rows)
    print(f"{'figure':<{width}}  {'before':>12}  {'after':>12}  after/before")
    for k, b, a, r in rows:
        print(f"{k:<{width}}  {b!s:>12}  {a!s:>12}  {r}")
    out = HERE / ".finetune" / "bench" / "compare_data_bench.json"
    out.write_text(json.dumps({"before": before, "after": after}, indent=2))


if __name__ == "__main__":
    main()
