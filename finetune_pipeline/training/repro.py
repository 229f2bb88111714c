"""The reproducibility record of a training run: seeds, library versions, hardware (taken where the training ran).

The adapter asset adds the spec hash, data digests, base weights digest and code version, and writes the whole
record into MLflow tags (``repro.*``) and the asset's metadata.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "safetensors")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    import torch

    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda or "none",
    }
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        hw["gpus"] = []
    return hw


def seeds(seed: int) -> dict[str, int]:
    """Every seed a run uses: all come from ``training.seed`` (data order, adapter init, dropout)."""
    return {"seed": seed, "data_seed": seed, "adapter_init_seed": seed}


def flatten(record: dict[str, Any], prefix: str = "repro") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"repro.a.b": "1"}`` for MLflow tags (values cut to MLflow's tag limit)."""
    out: dict[str, str] = {}
    for k, v in record.items():
        name = f"{prefix}.{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name))
        else:
            out[name] = str(v)[:5000]
    return out
