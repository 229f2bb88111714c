"""Unit tier: which dtype this machine trains in (models/hardware.py): the rule over measured speeds, the refusal
of a slow explicit dtype with the measured slowdown and the fix, and the per-machine measurement file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_pipeline.models.hardware import DtypeChoice, SlowDtypeError, decide_dtype

pytestmark = pytest.mark.unit

AVX512_BF16 = {"float32": 200.0, "bfloat16": 860.0, "float16": 30.0}
AVX2_ONLY = {"float32": 38.0, "bfloat16": 0.8, "float16": 0.7}

# ---- tier 1: the dtype rule (pure function of measured speeds) -------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "speeds", "allow", "expected"),
    [
        ("auto", AVX512_BF16, False, "bfloat16"),  # bf16 4x faster: taken
        ("auto", AVX2_ONLY, False, "float32"),  # bf16 50x slower: never by default
        ("auto", {"float32": 100.0, "bfloat16": 120.0}, False, "float32"),  # a marginal gain is not worth bf16
        ("bfloat16", AVX512_BF16, False, "bfloat16"),  # native: as asked
        ("bfloat16", AVX2_ONLY, True, "bfloat16"),  # slow but explicitly allowed
        ("float32", AVX2_ONLY, False, "float32"),
    ],
    ids=["auto-fast-bf16", "auto-avx2", "auto-marginal", "bf16-native", "bf16-allowed", "fp32"],
)
def test_dtype_rule(requested: str, speeds: dict, allow: bool, expected: str) -> None:
    choice = decide_dtype(requested, speeds, "cpu", allow_slow=allow)
    assert choice.dtype == expected and choice.gflops == speeds


@pytest.mark.parametrize("requested", ["bfloat16", "float16"])
def test_slow_explicit_dtype_is_refused_with_the_measured_slowdown(requested: str) -> None:
    with pytest.raises(SlowDtypeError) as err:
        decide_dtype(requested, AVX2_ONLY, "cpu")
    msg = str(err.value)
    slowdown = AVX2_ONLY["float32"] / AVX2_ONLY[requested]
    assert f"{slowdown:.0f}x slower" in msg and "model.dtype" in msg
    assert "model.dtype: auto" in msg and "allow_slow_dtype: true" in msg


@pytest.mark.parametrize(
    ("requested", "bf16", "expected"),
    [("auto", True, "bfloat16"), ("auto", False, "float32"), ("float16", False, "float16")],
)
def test_dtype_rule_on_cuda(requested: str, bf16: bool, expected: str) -> None:
    assert decide_dtype(requested, {}, "cuda", cuda_bf16=bf16).dtype == expected


def test_bf16_on_a_gpu_without_it_is_refused() -> None:
    with pytest.raises(SlowDtypeError, match="not supported natively by this GPU"):
        decide_dtype("bfloat16", {}, "cuda", cuda_bf16=False)


def test_real_measurement_picks_a_measured_dtype() -> None:
    """The measurement itself, on this machine: every candidate timed, quickly, and the choice follows the rule."""
    import time

    from finetune_pipeline.models import hardware

    hardware._CACHE.clear()
    t0 = time.perf_counter()
    choice = hardware.choose_dtype("auto")
    assert time.perf_counter() - t0 < 10
    assert set(choice.gflops) == {"float32", "bfloat16"} and all(v > 0 for v in choice.gflops.values())
    assert choice == decide_dtype("auto", choice.gflops, "cpu")
    assert isinstance(choice, DtypeChoice) and choice.as_metadata()["dtype_requested"] == "auto"


def test_measured_speeds_are_kept_per_machine(tmp_path: Path) -> None:
    """Every process on one machine decides from the same measurement (the file), measured once."""
    from finetune_pipeline.models import hardware

    first = hardware.dtype_speeds("cpu", ("float32",), cache_dir=tmp_path)
    files = list(tmp_path.glob("dtype_speeds-cpu-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == first
    files[0].write_text(json.dumps({"float32": 1.0}))  # a later process reads the stored figure, not a new timing
    assert hardware.dtype_speeds("cpu", ("float32",), cache_dir=tmp_path) == {"float32": 1.0}
