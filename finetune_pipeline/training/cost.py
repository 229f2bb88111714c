"""What a run costs: the machine's measured matmul peak, a model's training FLOPs per token, and peak memory.
The timing callback that estimates the whole run's time from its first steps is ``callbacks.Calibrate``.

Heavy imports stay inside functions.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MatmulPeak:
    dtype: str
    device: str
    size: int
    gflops: float


def measure_matmul_peak(dtype: str, device: str = "cpu", size: int = 2048, seconds: float = 1.0) -> MatmulPeak:
    """Best-of GFLOP/s of a square ``size`` matmul in ``dtype`` on ``device``: the ceiling FLOP utilisation is
    measured against (the same threads the training uses)."""
    import torch

    from finetune_pipeline.models.base import torch_dtype

    dt = torch_dtype(dtype)
    a = torch.randn(size, size, device=device).to(dt)
    b = torch.randn(size, size, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up (kernel selection, page faults)
    sync()
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < 3 or (time.perf_counter() - start < seconds and reps < 50):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return MatmulPeak(dtype, device, size, 2 * size**3 / best / 1e9)


def linear_params(model: Any) -> tuple[int, int]:
    """(weights in linear layers incl. the LM head, trainable among them). Embedding lookups do no matmul."""
    import torch

    total = trainable = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):  # bitsandbytes' 4-/8-bit layers and peft's lora_A/B are Linear too
            n = int(m.in_features) * int(m.out_features)
            total += n
            trainable += n if m.weight.requires_grad else 0
    return total, trainable


def train_flops_per_token(model: Any, avg_seq_len: float) -> float:
    """Model FLOPs per trained token: forward 2N, backward 2N for the activations plus 2N_trainable for the weight
    gradients (6N for full fine-tuning, ~4N for LoRA), plus causal attention (12 * layers * seq * hidden)."""
    n_lin, n_train = linear_params(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    attn = 12 * layers * avg_seq_len * hidden / 2  # QK^T and AV, forward + backward, causal half
    return 4 * n_lin + 2 * n_train + attn


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else the process's peak resident set size."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024
