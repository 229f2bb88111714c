"""What makes a training step on the CPU spend its time on the model's math: LoRA in the weights' half precision.

peft keeps the adapter weights in float32 when the base model is in bfloat16 / float16 (``autocast_adapter_dtype``)
and casts every adapted layer's input to float32 before the adapter: each of the model's adapted layers then makes a
float32 copy of its input, multiplies in float32, adds a float32 tensor of its output's size into the half-precision
result and casts that back. Profiled on SmolLM2-135M (LoRA r16 on all linear layers, bf16 weights, short rows), those
casts and float32 products took more of the step than the frozen model's own bf16 matmuls (bench/profile_step.py,
README "Where a training step goes").

``half_precision_lora`` keeps the adapter's float32 weights and optimizer state (no lost updates: AdamW updates the
float32 master copy) but runs each adapted layer under ``torch.autocast`` in the model's dtype with peft's input cast
switched off: the adapter's products and the add run in bf16, the weight gradients flow back to float32 through
autocast's cast. Every forward is covered (training, evaluation, generation), because the switch sits in the layers'
own forward hooks. torch is imported inside the functions only.
"""

from __future__ import annotations

from typing import Any


def adapter_in_half_precision(method: str, training: Any) -> bool:
    """Whether training switches the adapter to the weights' half precision (``half_precision_lora``): LoRA only
    (QLoRA's adapter stays on peft's float32 path), with ``training.half_precision_lora`` on."""
    return method == "lora" and bool(training.half_precision_lora)


def half_precision_lora(model: Any, dtype: str, device: str = "cpu") -> int:
    """Run the adapted layers of a LoRA ``model`` whose base weights are in ``dtype`` (bfloat16 / float16) under
    autocast in that dtype; returns the number of layers switched (0: nothing to do: float32, or no LoRA layers)."""
    import torch
    from peft.tuners.lora import LoraLayer

    if dtype not in ("bfloat16", "float16"):
        return 0
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float16
    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(module, torch.nn.Module):
            continue
        if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
            continue  # DoRA's weight norm stays in peft's float32 path
        base = getattr(module, "base_layer", None)
        if base is None or getattr(base, "weight", None) is None or base.weight.dtype != dt:
            continue
        module.cast_input_dtype_enabled = False
        module.register_forward_pre_hook(_enter(device, dt))
        module.register_forward_hook(_exit)
        n += 1
    return n


def _enter(device: str, dt: Any) -> Any:
    """The pre-hook: autocast on the device of the layer's input (the trainer moves the model to CUDA after the hooks
    are set: an autocast on ``device`` alone would not cover the CUDA products)."""
    import torch

    def pre(module: Any, args: Any) -> None:
        x = args[0] if args else None
        ctx = torch.autocast(device_type=x.device.type if isinstance(x, torch.Tensor) else device, dtype=dt)
        ctx.__enter__()
        module._fp_autocast = ctx

    return pre


def _exit(module: Any, args: Any, output: Any) -> None:
    ctx = module.__dict__.pop("_fp_autocast", None)
    if ctx is not None:
        ctx.__exit__(None, None, None)
