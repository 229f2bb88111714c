"""JSON document parsing: the reader before issue 9, a plain json.raw_decode loop, and today's reader, in one run.

Generates a ShareGPT-like JSON array (one object per conversation, pretty-printed like the public ShareGPT dumps,
~125 MB by default, ~35% of conversations starting with an assistant turn) locally, then times:

- ``before``: read_json_document as it was before issue 9 (loaded from git, ``--before-ref``, default main's
  merge base), parse + per-record type checks into Arrow tables;
- ``plain_loop``: the reference: ``json.JSONDecoder.raw_decode`` over the array's elements, nothing else;
- ``orjson_whole`` (when orjson is installed): one ``orjson.loads`` of the whole document, no source lines;
- ``now``: today's read_json_document (parse + per-record type checks into Arrow tables, with source lines).

    python bench/json_bench.py            # ~125 MB
    python bench/json_bench.py --mb 20    # smaller
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from finetune_pipeline.data.readers import read_file  # noqa: E402
from finetune_pipeline.spec import SourceSpec  # noqa: E402

WORDS = (
    "the a to of and in is it you that for on with as this be are can your have or not by an will at from "
    "python code function data model error file list value use example return string output time system "
    "question answer explain write help need make work way first new please thanks über café naïve 東京"
).split()


def generate(path: Path, mb: float, seed: int = 0) -> int:
    rng = random.Random(seed)
    target = int(mb * 1_000_000)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n")
        size = 2
        while size < target:
            turns = []
            first_gpt = rng.random() < 0.35
            for t in range(rng.randint(2, 12)):
                who = ("gpt" if t % 2 == 0 else "human") if first_gpt else ("human" if t % 2 == 0 else "gpt")
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 220)))
                turns.append({"from": who, "value": text})
            rec = {"id": f"conv{n}_{rng.randint(0, 9)}", "conversations": turns}
            s = ("" if n == 0 else ",\n") + json.dumps(rec, indent=2, ensure_ascii=False)
            f.write(s)
            size += len(s.encode())
            n += 1
        f.write("\n]\n")
    return n


def plain_loop(data: bytes) -> int:
    text = data.decode("utf-8")
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    n = 0
    ws = " \t\r\n"
    while True:
        while text[pos] in ws:
            pos += 1
        if text[pos] == "]":
            return n
        _, pos = dec.raw_decode(text, pos)
        n += 1
        while text[pos] in ws:
            pos += 1
        if text[pos] == ",":
            pos += 1


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
    sys.modules["formats_before"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def timed(fn, *a):  # type: ignore[no-untyped-def]
    gc.collect()
    t0 = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=125.0)
    default_ref = subprocess.run(
        ["git", "-C", str(REPO), "merge-base", "HEAD", "main"], capture_output=True, text=True
    ).stdout.strip()
    ap.add_argument("--before-ref", default=default_ref or "HEAD")
    ap.add_argument("--out", default=str(REPO / ".finetune" / "bench" / "json_bench.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    path = work / "sharegpt.json"
    n = generate(path, args.mb)
    data = path.read_bytes()
    source = SourceSpec(incoming_dir="in", file_format="json", record_format="sharegpt")
    results: dict[str, float] = {}
    before = load_before(args.before_ref)
    results["before"], r0 = timed(before.read_json_document, path, data, source)
    results["plain_loop"], n_loop = timed(plain_loop, data)
    try:
        import orjson

        results["orjson_whole"], _ = timed(orjson.loads, data)
    except ImportError:
        pass
    results["now"], r1 = timed(read_file, path, source)
    rows0 = sum(t.num_rows for t in r0.tables)
    rows1 = sum(t.num_rows for t in r1.tables)
    assert n_loop == n and rows1 == n and rows0 == n, (n, n_loop, rows0, rows1)
    lines0 = [x for t in r0.tables for x in t.column("_line").to_pylist()]
    lines1 = [x for t in r1.tables for x in t.column("_line").to_pylist()]
    assert lines0 == lines1, "source lines differ"
    report = {
        "mb": round(len(data) / 1e6, 1),
        "records": n,
        "seconds": {k: round(v, 3) for k, v in results.items()},
        "speedup_now_vs_before": round(results["before"] / results["now"], 2),
        "now_vs_plain_loop": round(results["now"] / results["plain_loop"], 2),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
