"""Bytes in vs peak memory of the readers and of the whole cleaning: a generated ShareGPT-shaped JSON array
(pretty-printed like the public exports; ~1 GB by default), the same records as JSON Lines and as Parquet, each read
in a fresh process (peak = VmHWM of that process, its baseline after the imports reported too).

``--stage read``: ``read_file``, today's readers (``after``) and the readers of ``--before-ref`` (``before``:
data/formats.py as it was, loaded from git). ``--stage clean``: what cleaned_dataset does with a drop (clean_file,
then the kept rows and the quarantine written as Parquet): today's code streaming to the files (``after``) and the
code of a checkout given by ``--before-tree`` (``before``: its clean_file holds the drop, then writes the frames).

    nice python bench/memory_bench.py                      # ~1 GB, read, before and after
    python bench/memory_bench.py --mb 100 --skip-before    # smaller, today's readers only
    python bench/memory_bench.py --stage clean --before-tree ../base   # the cleaning, before and after

Results: .finetune/bench/memory_bench.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(REPO))  # the tree measured
sys.path.insert(1, str(REPO / "bench"))


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory. Not ru_maxrss: Linux carries it over from
    the parent across fork and exec, so a child started by a large parent would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def derive(array: Path, jsonl: Path, parquet: Path, csv_file: Path) -> None:
    """The array's records as JSON Lines, Parquet and CSV (the conversation as JSON text in its column; streamed:
    never the whole array in memory)."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from finetune_pipeline.data.readers import json_stream

    writer = None
    batch: list[dict] = []
    with array.open("rb") as f, jsonl.open("w", encoding="utf-8") as out, csv_file.open("w", newline="") as c:
        table = csv.writer(c)
        table.writerow(["id", "conversations"])
        s = json_stream.Stream(f)
        for raw, _, _ in json_stream.elements(s, s.ws(0), [], []):
            rec = json.loads(raw)
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            table.writerow([rec.get("id"), json.dumps(rec.get("conversations"), ensure_ascii=False)])
            batch.append(rec)
            if len(batch) >= 20_000:
                t = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(parquet, t.schema)
                writer.write_table(t)
                batch = []
    if batch:
        t = pa.Table.from_pylist(batch)
        writer = writer or pq.ParquetWriter(parquet, t.schema)
        writer.write_table(t)
    if writer:
        writer.close()


def load_before(ref: str):  # type: ignore[no-untyped-def]
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:finetune_pipeline/data/formats.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    tmp = Path(tempfile.mkdtemp()) / "formats_before.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("formats_before", tmp)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["formats_before"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def measure_clean(path: Path, impl: str, work: Path) -> dict:
    """One cleaning as cleaned_dataset runs it, in this (fresh) process whose ``finetune_pipeline`` is the tree
    being measured."""
    from finetune_pipeline.data.clean import clean_file, write_parquet_atomic
    from finetune_pipeline.spec import PipelineSpec

    spec = PipelineSpec.model_validate(
        {
            "name": "bench",
            "source": {"incoming_dir": "in", "record_format": "sharegpt"},
            "registry": {"model_name": "m"},
        }
    )
    kept, quarantine = work / f"kept_{impl}.parquet", work / f"quarantine_{impl}.parquet"
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    if impl == "after":
        res = clean_file(path, "bench", spec, kept_path=kept, quarantine_path=quarantine)
        n_quarantined = res.quarantined
    else:
        res = clean_file(path, "bench", spec)
        write_parquet_atomic(res.quarantine, quarantine)
        write_parquet_atomic(res.kept, kept)
        n_quarantined = len(res.quarantine)
    seconds = time.perf_counter() - t0
    return {
        "rows": len(res.kept),
        "rows_in": res.rows_in,
        "rejects": n_quarantined,
        "duplicates": len(res.duplicates),
        "seconds": round(seconds, 2),
        "baseline_rss_mb": round(base),
        "peak_rss_mb": round(_rss_mb()),
    }


def measure(path: Path, impl: str, ref: str) -> dict:
    """One reading, in this (fresh) process."""
    from finetune_pipeline.spec import SourceSpec

    if impl == "before":
        read_file = load_before(ref).read_file
    else:
        from finetune_pipeline.data.readers import read_file
    source = SourceSpec(incoming_dir="in", record_format="sharegpt")
    base = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    res = read_file(path, source)
    seconds = time.perf_counter() - t0
    rows = sum(t.num_rows for t in res.tables)
    return {
        "rows": rows,
        "rows_in": res.rows_in,
        "rejects": len(res.rejects),
        "seconds": round(seconds, 2),
        "baseline_rss_mb": round(base),
        "peak_rss_mb": round(_rss_mb()),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1000.0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "finetune_memory_bench")
    ap.add_argument("--before-ref", default="main")
    ap.add_argument("--skip-before", action="store_true")
    ap.add_argument("--formats", default="json,jsonl,parquet,csv")
    ap.add_argument("--out", type=Path, help="default .finetune/bench/memory_bench[_clean].json")
    ap.add_argument("--stage", choices=["read", "clean"], default="read")
    ap.add_argument("--before-tree", type=Path, help="a checkout of the code to compare with (--stage clean)")
    ap.add_argument("--measure", nargs=2, metavar=("PATH", "IMPL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        if args.stage == "clean":
            print(json.dumps(measure_clean(Path(args.measure[0]), args.measure[1], args.work)))
        else:
            print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.before_ref)))
        return
    if args.stage == "clean" and not args.skip_before and args.before_tree is None:
        ap.error("--stage clean compares with --before-tree (a checkout), or give --skip-before")
    from json_bench import generate

    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.mb:g}mb"
    files = {f: args.work / f"sharegpt_{tag}.{f}" for f in ("json", "jsonl", "parquet", "csv")}
    if not files["json"].exists():
        print(f"generating {files['json']} ...", flush=True)
        generate(files["json"], args.mb)
    if not all(files[f].exists() for f in ("jsonl", "parquet", "csv")):
        print("deriving JSON Lines, Parquet and CSV ...", flush=True)
        derive(files["json"], files["jsonl"], files["parquet"], files["csv"])
    rows = []
    for fmt in args.formats.split(","):
        for impl in ["before", "after"][1 if args.skip_before else 0 :]:
            cmd = [sys.executable, __file__, "--measure", str(files[fmt]), impl, "--before-ref", args.before_ref]
            cmd += ["--stage", args.stage, "--work", str(args.work)]
            tree = args.before_tree if impl == "before" and args.stage == "clean" else REPO
            env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                r = {"error": out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]}
            else:
                r = json.loads(out.stdout.splitlines()[-1])
            r = {"stage": args.stage, "format": fmt, "reader": impl, "bytes": files[fmt].stat().st_size, **r}
            if "peak_rss_mb" in r:
                r["reader_mb"] = r["peak_rss_mb"] - r["baseline_rss_mb"]  # above the process after its imports
                r["peak_rss_per_file_byte"] = round(r["peak_rss_mb"] * 2**20 / r["bytes"], 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
    args.out = (
        args.out or REPO / ".finetune" / "bench" / f"memory_bench{'_clean' if args.stage == 'clean' else ''}.json"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(
        f"\n{'format':8} {'reader':7} {'MB':>8} {'rows':>9} {'s':>7} {'peak RSS MB':>12} {'reader MB':>10} {'RSS/file':>9}"
    )
    for r in rows:
        if "error" in r:
            print(f"{r['format']:8} {r['reader']:7} {r['bytes'] / 1e6:8.0f} error: {r['error']}")
            continue
        print(
            f"{r['format']:8} {r['reader']:7} {r['bytes'] / 1e6:8.0f} {r['rows']:9d} {r['seconds']:7.1f} "
            f"{r['peak_rss_mb']:12d} {r['reader_mb']:10d} {r['peak_rss_per_file_byte']:9.2f}"
        )


if __name__ == "__main__":
    main()
