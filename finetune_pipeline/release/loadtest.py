"""A bounded loopback load test: N chat requests at a given concurrency against an OpenAI-style endpoint, with
latency percentiles, output tokens per second and the server process's peak memory.

``load_test`` only speaks HTTP (``POST {base_url}/v1/chat/completions``), so it measures any OpenAI-compatible
server; ``measure_artifact`` serves one artifact with ``finetune-pipeline serve``'s engine and routes
(``release.artifact_server``) in its own process and reads that process's peak resident memory (Linux ``VmHWM``).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from finetune_pipeline.release.artifact_server import SERVER


class LoadResult(BaseModel):
    concurrency: int
    requests: int
    errors: int
    p50_s: float
    p95_s: float
    tokens_per_s: float
    wall_s: float
    first_error: str | None = None


class ServingNumbers(BaseModel):
    format: str
    server: str
    startup_s: float
    peak_rss_mb: float
    runs: list[LoadResult]
    largest_batch: int = 0  # the most requests the server generated together (its /health)


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def load_test(
    base_url: str, prompts: list[list[dict[str, str]]], n: int, concurrency: int, max_tokens: int
) -> LoadResult:
    """``n`` requests (cycling through ``prompts``), ``concurrency`` in flight at once, greedy."""
    import httpx

    errors: list[str] = []

    def one(i: int) -> tuple[float, int, bool]:
        body = {"messages": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0.0}
        t0 = time.perf_counter()
        try:
            r = client.post(f"{base_url}/v1/chat/completions", json=body)
            ok = r.status_code == 200
            toks = int(r.json().get("usage", {}).get("completion_tokens", 0)) if ok else 0
            if not ok:
                errors.append(f"HTTP {r.status_code}: {r.text[:300]}")
        except httpx.HTTPError as exc:
            ok, toks = False, 0
            errors.append(repr(exc)[:300])
        return time.perf_counter() - t0, toks, ok

    with httpx.Client(timeout=600.0) as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    lat = [r[0] for r in results if r[2]]
    return LoadResult(
        concurrency=concurrency,
        requests=n,
        errors=sum(not r[2] for r in results),
        p50_s=_percentile(lat, 0.5),
        p95_s=_percentile(lat, 0.95),
        tokens_per_s=sum(r[1] for r in results) / wall if wall > 0 else math.nan,
        wall_s=wall,
        first_error=errors[0] if errors else None,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a live process (Linux VmHWM), in MB; NaN where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def measure_artifact(
    fmt: str,
    path: Path,
    prompts: list[list[dict[str, str]]],
    n: int,
    levels: list[int],
    max_tokens: int,
    startup_timeout: float = 300.0,
) -> ServingNumbers:
    """Serve one artifact on 127.0.0.1 in a child process, run ``load_test`` at each concurrency level (after one
    warm-up request), read the child's peak memory, stop it."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "finetune_pipeline.release.artifact_server", "--format", fmt, "--path", str(path)]
    cmd += ["--port", str(port)]
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server cannot block on a full pipe
    proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=err, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                err.seek(0)
                raise RuntimeError(f"the {fmt} server exited ({proc.returncode}): {err.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > startup_timeout:
                raise TimeoutError(f"the {fmt} server did not answer /health within {startup_timeout:.0f} s")
            time.sleep(0.5)
        startup = time.perf_counter() - t0
        warm = load_test(url, prompts, 1, 1, max_tokens)  # warm-up, not counted
        if warm.errors:
            raise RuntimeError(f"the {fmt} server refused a load-test request: {warm.first_error}")
        runs = [load_test(url, prompts, n, c, max_tokens) for c in levels]
        peak = peak_rss_mb(proc.pid)
        largest = int(httpx.get(f"{url}/health", timeout=10.0).json().get("largest_batch", 0))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()
    return ServingNumbers(
        format=fmt, server=SERVER, startup_s=startup, peak_rss_mb=peak, runs=runs, largest_batch=largest
    )


def summary(s: ServingNumbers) -> dict[str, Any]:
    return {f"c{r.concurrency}": {"p50_s": r.p50_s, "p95_s": r.p95_s, "tokens_per_s": r.tokens_per_s} for r in s.runs}
