"""What a run costs: the machine's measured matmul peak, a model's training FLOPs per token, and peak memory.
The timing callback that estimates the whole run's time from its first steps is ``callbacks.Calibrate``.

Heavy imports stay inside functions.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
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
    from finetune_pipeline.models.base import resolve_dtype
    from finetune_pipeline.models.hardware import matmul_benchmark

    size, gflops = matmul_benchmark(resolve_dtype(dtype), device, seconds, max_size=size, min_size=size)
    return MatmulPeak(dtype, device, size, gflops)


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
    # Linux: VmHWM is this address space's high-water mark. ru_maxrss is not: it survives fork + exec, so a child
    # started from a big process (a Dagster step, pytest) would report its parent's size as its own peak.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def current_rss_mb() -> float:
    """Resident set size of this process now (Linux /proc; the peak so far elsewhere)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_memory_mb("cpu")


def estimate_memory(
    model: Any, model_spec: Any, training: Any, dtype: str, device: str, seq_len: float, loss_share: float = 1.0
) -> dict[str, float]:
    """Estimated peak memory of a training run in MB, by part, computed before training starts.

    weights: the loaded model's parameters and buffers as they are (quantised ones at their packed size);
    gradients and optimizer: per trainable parameter (AdamW keeps two float32 moments, 8-bit AdamW two bytes,
    Adafactor ~factored, SGD none); activations: what autograd keeps per token and layer of a llama-style block for
    ``per_device_train_batch_size`` rows (the micro-batch) of ``seq_len`` tokens: the two RMSNorms' input, normalised and scaled
    values (6h with the residual), q and k before and after rotary embedding with the rotated halves (2h + 2kv), the
    keys and values repeated to every head (2h), the attention output and its reshaped copy (2h), the attention
    probabilities (heads x seq_len: a padded batch takes SDPA's math path), the MLP's gate, SiLU, up and product
    (4i), each adapter's rank-r activation and one output-sized tensor per adapted layer, and with dropout each
    adapted layer's dropped-out input and mask; with
    gradient checkpointing only each layer's input plus one layer recomputed. Under half-precision weights peft keeps
    a float32 copy of each adapted layer's input (not when the adapter runs in that precision: ``half_precision_lora``).
    The loss: float32 logits, their softmax and its gradient over the vocabulary at the ``loss_share`` of positions
    that carry loss (the lean loss projects only those; 1.0 when every position does). runtime (CPU only): the
    process's memory outside the model (libraries, allocator) measured now, as the peak resident set size counts it
    too."""
    b = _BYTES.get(dtype, 4)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(x.numel() * x.element_size() for x in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    per_param = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_lion_8bit": 1, "sgd": 0, "adafactor": 1}
    optimizer = n_train * per_param.get(training.optim, 8) + (4 * n_train if b != 4 and device == "cpu" else 0)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    h = int(getattr(cfg, "hidden_size", 0) or 0)
    inter = int(getattr(cfg, "intermediate_size", 4 * h) or 4 * h)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    kv = h // heads * int(getattr(cfg, "num_key_value_heads", heads) or heads)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    from finetune_pipeline.training.configs import batch_fields

    tokens = batch_fields(training)[0] * seq_len
    adapted = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    lora_in = sum(int(m.in_features) for m in adapted)
    rank = sum(int(m.out_features) for m in adapted) // max(1, layers)
    dropout = float(getattr(getattr(model_spec, "lora", None), "dropout", 0.0) or 0.0) if adapted else 0.0
    block = 12 * h + 2 * kv + 4 * inter + heads * seq_len + rank  # values kept per token in one layer (see above)
    block_bytes = block * b + (lora_in // max(1, layers)) * (b + 1) * (dropout > 0)  # dropped-out inputs, masks
    if training.gradient_checkpointing:
        act = tokens * (layers * h * b + block_bytes)  # the layers' inputs, and one layer recomputed in backward
    else:
        act = tokens * layers * block_bytes
    # peft runs the adapter in float32: with half-precision weights each adapted layer keeps a float32 copy of its input,
    # unless the adapter runs in the weights' dtype (speed.adapter_in_half_precision)
    from finetune_pipeline.training.speed import adapter_in_half_precision

    act += tokens * lora_in * 4 if b != 4 and not adapter_in_half_precision(model_spec.method, training) else 0
    # and each adapted layer keeps one tensor of its output's size (measured on SmolLM2-135M, LoRA on all linear
    # layers: +1.09 GB over full fine-tuning's forward at 8 x 204 tokens, one output's worth per adapted layer)
    act += tokens * sum(int(m.out_features) for n, m in model.named_modules() if n.endswith("lora_B.default")) * b
    logits = tokens * loss_share * vocab * 4 * 3  # float32 logits, their softmax and its gradient
    parts = {
        "weights_mb": weights / 2**20,
        "gradients_mb": grads / 2**20,
        "optimizer_mb": optimizer / 2**20,
        "activations_mb": (act + logits) / 2**20,
    }
    if device == "cpu":
        parts["runtime_mb"] = max(0.0, current_rss_mb() - weights / 2**20)
    parts["total_mb"] = sum(parts.values())
    return parts


CUDA_BUDGET_SHARE = 0.9  # of the device memory this process may use, for the micro-batch rule
CPU_BUDGET_SHARE = 0.8  # of the machine memory this process may use (other processes and the page cache move more)


def memory_budget_mb(device: str) -> float | None:
    """The memory the micro-batch rule (``configs.choose_micro_batch``) holds the estimate against, in MB: on CUDA
    (free device memory + what this process's allocator already holds) x 0.9; on a CPU (MemAvailable + this
    process's resident memory) x 0.8. What this process holds counts because the estimate includes the weights
    already loaded (and on a CPU the runtime's memory). None when the machine does not say."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info()
        return (free + torch.cuda.memory_reserved()) / 2**20 * CUDA_BUDGET_SHARE
    available = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) / 1024
                break
    except OSError:
        pass
    if available is None:
        try:  # no /proc (macOS): free pages, without the reclaimable cache
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (ValueError, OSError, AttributeError):
            return None
    return (available + current_rss_mb()) * CPU_BUDGET_SHARE
