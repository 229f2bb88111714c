"""What a run costs: the machine's measured matmul peak, a model's training FLOPs per token, peak memory,
and a timing callback that estimates the whole run's time from its first steps.

Heavy imports stay inside functions.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
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


def make_calibration_callback(steps: int, max_steps: int, log: Callable[[str], None], sink: dict[str, float]) -> Any:
    """A TrainerCallback timing the first ``steps`` steps after a warm-up step, then logging the run's estimated
    time before the long part starts. Writes ``seconds_per_step`` and ``estimated_seconds`` into ``sink``."""
    from transformers import TrainerCallback

    class _Calibrate(TrainerCallback):
        def __init__(self) -> None:
            self.t_begin = 0.0
            self.t_first = 0.0
            self.first_step = -1

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t_begin = time.perf_counter()
            self.first_step = state.global_step  # > 0 after a resume

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            done = state.global_step - self.first_step
            if done == 1:  # the first step pays one-off costs (allocations, kernel selection)
                self.t_first = time.perf_counter()
            elif done == steps + 1:
                per_step = (time.perf_counter() - self.t_first) / steps
                remaining = max_steps - state.global_step
                elapsed = time.perf_counter() - self.t_begin
                sink["seconds_per_step"] = per_step
                sink["estimated_seconds"] = elapsed + per_step * remaining
                log(
                    f"calibration: {per_step:.2f} s/step over {steps} steps -> estimated "
                    f"{sink['estimated_seconds']:.0f} s for the run's {max_steps - self.first_step} steps "
                    f"({remaining} to go, evaluation not included)"
                )

    return _Calibrate()
