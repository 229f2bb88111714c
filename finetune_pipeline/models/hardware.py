"""Which dtype this machine computes fast: measured, not guessed from CPU flags.

CPUs of the same family differ: on one with AVX512-BF16 a bfloat16 matmul runs ~4x faster than float32, on an
AVX2-only one torch falls back to a scalar kernel and bfloat16 runs ~50x slower. ``dtype_speeds`` times a short
matmul per candidate dtype (well under a second in all, cached per process); ``decide_dtype`` is the pure rule that
turns the spec's ``model.dtype`` and those speeds into the dtype to train in, or refuses a dtype the hardware cannot
run natively with a message that gives the measured slowdown and the fix.

torch is imported inside the functions only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

CPU_CANDIDATES = ("float32", "bfloat16", "float16")
# 'auto' on CPU takes a half-precision dtype only when its matmul is at least this much faster than float32: half
# precision costs some accuracy in the frozen weights' activations, so a marginal speed-up is not worth it.
AUTO_MIN_SPEEDUP = 1.5
# An explicit dtype whose matmul is this much slower than float32 is refused (unless model.allow_slow_dtype).
SLOW_FACTOR = 1.25
_CACHE: dict[tuple[str, str], float] = {}


class SlowDtypeError(ValueError):
    """The spec pins a dtype this machine runs far slower than float32 (or cannot run)."""


@dataclass(frozen=True)
class DtypeChoice:
    requested: str  # the spec's model.dtype
    dtype: str  # what the run uses
    device: str
    gflops: dict[str, float] = field(default_factory=dict)  # measured matmul GFLOP/s per candidate dtype
    reason: str = ""

    def as_metadata(self) -> dict[str, object]:
        return {
            "dtype_requested": self.requested,
            "dtype": self.dtype,
            "dtype_reason": self.reason,
            **{f"matmul_gflops_{k}": round(v, 1) for k, v in self.gflops.items()},
        }


def matmul_benchmark(
    dtype: str, device: str = "cpu", seconds: float = 0.25, max_size: int = 1024, min_size: int = 256
) -> tuple[int, float]:
    """(size, GFLOP/s) of a square matmul in ``dtype``: the best of the repetitions that fit in about ``seconds``.

    Starts at ``min_size`` and doubles the size while one product takes under 20 ms (up to ``max_size``), so a dtype
    that falls back to a scalar kernel costs a fraction of a second instead of minutes. The one matmul micro-benchmark:
    ``matmul_gflops`` (the dtype decision) and ``training.cost.measure_matmul_peak`` (the FLOP utilisation's ceiling,
    one fixed size) both time it here."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    size, best = min_size, float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        a = torch.randn(size, size, device=device).to(dt)
        b = torch.randn(size, size, device=device).to(dt)
        a @ b  # warm-up: kernel selection, page faults
        sync()
        best = float("inf")
        reps = 0
        while reps < 3 or (time.perf_counter() < deadline and reps < 50):
            t0 = time.perf_counter()
            a @ b
            sync()
            best = min(best, time.perf_counter() - t0)
            reps += 1
        if best > 0.02 or size >= max_size or time.perf_counter() > deadline:
            break
        size *= 2
    return size, 2 * size**3 / best / 1e9


def matmul_gflops(dtype: str, device: str = "cpu", seconds: float = 0.25, max_size: int = 1024) -> float:
    """``matmul_benchmark``'s GFLOP/s, cached per (dtype, device) for this process."""
    key = (dtype, device)
    if key not in _CACHE:
        _CACHE[key] = matmul_benchmark(dtype, device, seconds, max_size)[1]
    return _CACHE[key]


def _machine_key() -> str:
    """This CPU model and flags, torch's version and thread count, and the instruction sets torch and oneDNN are
    told to stop at: what the measured speeds depend on."""
    import hashlib
    import platform

    import torch

    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))), "")
        flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    except OSError:
        model = flags = ""
    isa = [f"{k}={os.environ.get(k, '')}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")]  # they cap the ISA
    raw = "|".join([platform.machine(), model, flags, torch.__version__, str(torch.get_num_threads()), *isa])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def dtype_speeds(
    device: str = "cpu", candidates: tuple[str, ...] = CPU_CANDIDATES, cache_dir: Path | None = None
) -> dict[str, float]:
    """Measured matmul GFLOP/s per candidate dtype on ``device``: cached per process and, with ``cache_dir``, in a
    file per machine (CPU model and flags, torch version, threads), so that every training process on one machine
    decides the same way (a timing under heavy load could otherwise tip a close decision differently from one run
    to the next) and pays the measurement once."""
    path = cache_dir / f"dtype_speeds-{device}-{_machine_key()}.json" if cache_dir is not None else None
    stored: dict[str, float] = {}
    if path is not None and path.exists():
        try:
            stored = {k: float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, OSError, AttributeError):
            stored = {}
    out = {d: stored[d] if d in stored else matmul_gflops(d, device) for d in candidates}
    if path is not None and any(d not in stored for d in candidates):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**stored, **out}))
        tmp.replace(path)
    return out


def decide_dtype(
    requested: str,
    gflops: dict[str, float],
    device: str = "cpu",
    allow_slow: bool = False,
    cuda_bf16: bool = False,
    field_name: str = "model.dtype",
) -> DtypeChoice:
    """The dtype to train in, from the spec's ``model.dtype`` and the measured matmul speeds (a pure rule).

    - 'auto' on CUDA: bfloat16 where the GPU supports it, else float32.
    - 'auto' on CPU: bfloat16 when its matmul is at least ``AUTO_MIN_SPEEDUP`` x float32's, else float32 (float16
      is never picked on CPU: no loss scaling there).
    - an explicit dtype runs when the hardware runs it natively; one ``SLOW_FACTOR`` x slower than float32 (or
      bfloat16 on a GPU without it) raises ``SlowDtypeError`` naming the measured slowdown and the fix, unless
      ``allow_slow`` (``model.allow_slow_dtype``).
    """
    if device.startswith("cuda"):
        if requested == "auto":
            dt = "bfloat16" if cuda_bf16 else "float32"
            return DtypeChoice(
                requested, dt, device, gflops, f"auto on CUDA: {'bf16 supported' if cuda_bf16 else 'no bf16'}"
            )
        if requested == "bfloat16" and not cuda_bf16 and not allow_slow:
            raise SlowDtypeError(
                f"{field_name}: bfloat16 is not supported natively by this GPU; set {field_name}: auto "
                "(float32 here) or float16, or model.allow_slow_dtype: true to run it anyway"
            )
        return DtypeChoice(requested, requested, device, gflops, "as the spec asks")
    fp32 = gflops.get("float32")
    if requested == "auto":
        bf16 = gflops.get("bfloat16")
        if fp32 and bf16 and bf16 >= AUTO_MIN_SPEEDUP * fp32:
            return DtypeChoice(
                requested, "bfloat16", device, gflops, f"auto: bfloat16 matmul {bf16 / fp32:.1f}x float32's here"
            )
        ratio = f" (bfloat16 {bf16 / fp32:.2f}x float32's)" if fp32 and bf16 else ""
        return DtypeChoice(requested, "float32", device, gflops, f"auto: float32{ratio}")
    if requested == "float32":
        return DtypeChoice(requested, "float32", device, gflops, "as the spec asks")
    speed = gflops.get(requested)
    if fp32 and speed is not None and speed * SLOW_FACTOR < fp32:
        slowdown = fp32 / max(speed, 1e-9)
        msg = (
            f"{field_name}: {requested} is not native on this CPU: its matmul ran at {speed:.1f} GFLOP/s against "
            f"{fp32:.1f} GFLOP/s in float32 ({slowdown:.0f}x slower), so training would take about {slowdown:.0f}x "
            f"as long. Set {field_name}: auto (picks the fastest dtype this machine runs natively) or float32; "
            "to run it anyway set model.allow_slow_dtype: true"
        )
        if not allow_slow:
            raise SlowDtypeError(msg)
        return DtypeChoice(
            requested, requested, device, gflops, f"allowed by model.allow_slow_dtype: {slowdown:.0f}x slower"
        )
    return DtypeChoice(requested, requested, device, gflops, "as the spec asks (native here)")


def choose_dtype(requested: str, allow_slow: bool = False) -> DtypeChoice:
    """``decide_dtype`` on this machine: CUDA when available, else the CPU with measured matmul speeds (kept in
    ``<state root>/hardware/``; delete that folder to measure again)."""
    import torch

    if torch.cuda.is_available():
        return decide_dtype(requested, {}, "cuda", allow_slow, cuda_bf16=bool(torch.cuda.is_bf16_supported()))
    from finetune_pipeline.paths import state_root

    candidates = ("float32", "bfloat16") if requested == "auto" else tuple({"float32", requested})
    speeds = dtype_speeds("cpu", tuple(sorted(candidates)), cache_dir=state_root() / "hardware")
    return decide_dtype(requested, speeds, "cpu", allow_slow)
