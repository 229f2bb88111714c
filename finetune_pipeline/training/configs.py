"""Pure translators from the spec to the libraries' config objects, in the trl style: plain spec sections in,
peft ``LoraConfig`` / trl ``SFTConfig`` out. Sweep parameters are already applied to the spec
(``PipelineSpec.with_overrides``), so nothing here knows about overrides. Heavy imports stay inside the functions.

The base model's quantization config lives with the model loading (``models.base.quantization_config``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_pipeline.spec import LoraSpec, RuntimeSpec, TrainingSpec


def lora_config(lora: LoraSpec) -> Any:
    """peft ``LoraConfig`` from the spec's ``model.lora`` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        task_type="CAUSAL_LM",
    )


def sft_config(
    training: TrainingSpec,
    runtime: RuntimeSpec,
    *,
    output_dir: str,
    use_cuda: bool,
    dtype: str,
    do_eval: bool,
    saving: bool,
    steps: int | None = None,
) -> Any:
    """trl ``SFTConfig`` for one run.

    ``output_dir``: where the trainer writes checkpoints; ``use_cuda``: train on the GPU; ``dtype``: the resolved
    weight dtype (bf16 / fp16 autocast only on CUDA: on CPU the weights are already in that dtype and autocast
    would only add casts); ``do_eval``: evaluate every ``training.eval_steps``; ``saving``: checkpoint every
    ``runtime.save_steps``; ``steps``: the run's planned step count (from ``max_steps`` or ``num_train_epochs``,
    see ``sft.planned_steps``). NaN losses are logged as they are (``logging_nan_inf_filter`` off) so that the
    guard sees them. The batch is ``batch_fields``: with both batch fields left out that is the provisional 8 x 1,
    which ``sft.setup`` replaces on the trainer's arguments once ``choose_micro_batch`` has chosen.
    """
    from trl import SFTConfig

    t, rt = training, runtime
    if t.learning_rate is None:
        raise ValueError("training.learning_rate is left out: resolve it first (sft.setup uses default_learning_rate)")
    micro, accumulation = batch_fields(t)
    return SFTConfig(
        output_dir=output_dir,
        max_steps=steps or t.max_steps or 1,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=warmup_steps(t, steps or t.max_steps or 1),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        # trl does not truncate in padding-free mode without packing: rows are bounded by cleaning.max_tokens instead
        max_length=None if (t.padding_free and not t.packing) else t.max_length,
        packing=t.packing,
        padding_free=t.padding_free or t.packing,
        assistant_only_loss=t.assistant_only_loss,
        completion_only_loss=None if t.assistant_only_loss else t.completion_only_loss,
        logging_steps=rt.logging_steps,
        eval_strategy="steps" if do_eval else "no",
        eval_steps=t.eval_steps or None,
        metric_for_best_model="eval_loss" if t.early_stopping_patience else None,
        greater_is_better=False if t.early_stopping_patience else None,
        save_strategy="steps" if saving else "no",
        save_steps=rt.save_steps or 500,
        save_total_limit=rt.save_total_limit,
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=not use_cuda,
        bf16=dtype == "bfloat16" and use_cuda,
        fp16=dtype == "float16" and use_cuda,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        logging_nan_inf_filter=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def default_learning_rate(parameters: int, method: str, effective_batch: int) -> float:
    """The peak learning rate when the spec leaves it out: an anchor (LoRA / QLoRA 2e-4, full fine-tuning 1e-5, at
    a 7B model and an effective batch of 16, the usual published settings) scaled by sqrt(7e9 / parameters) (smaller
    models take larger steps) and sqrt(effective batch / 16) (square-root batch scaling), kept within
    [2e-5, 2e-3] (adapters) or [1e-6, 1e-4] (full)."""
    anchor, low, high = (1e-5, 1e-6, 1e-4) if method == "full" else (2e-4, 2e-5, 2e-3)
    lr = anchor * math.sqrt(7e9 / max(1, parameters)) * math.sqrt(max(1, effective_batch) / 16)
    return float(f"{min(high, max(low, lr)):.3g}")


DEFAULT_BATCH = 8  # per-device examples per optimizer step when the spec leaves the batch out


def batch_left_out(t: TrainingSpec) -> bool:
    """Both ``per_device_train_batch_size`` and ``gradient_accumulation_steps`` left out: the micro-batch is chosen
    from the memory estimate (``choose_micro_batch``)."""
    return t.per_device_train_batch_size is None and t.gradient_accumulation_steps is None


def batch_fields(t: TrainingSpec) -> tuple[int, int]:
    """(per-device micro-batch, gradient accumulation) as the spec gives them: both set, as given; only the
    micro-batch set, accumulation 1; only accumulation set, micro-batch 8; both left out, 8 x 1 until
    ``choose_micro_batch`` splits those 8 examples per device (same effective batch)."""
    micro = t.per_device_train_batch_size
    accumulation = t.gradient_accumulation_steps
    return (DEFAULT_BATCH if micro is None else micro), (1 if accumulation is None else accumulation)


def effective_batch(t: TrainingSpec) -> int:
    """Examples per optimizer step: per-device batch x accumulation x processes (a left-out batch counts 8 x 1:
    the micro-batch rule keeps the product)."""
    micro, accumulation = batch_fields(t)
    return micro * accumulation * t.num_processes


@dataclass(frozen=True)
class MicroBatch:
    """The micro-batch ``choose_micro_batch`` chose: ``micro`` x ``accumulation`` examples per device and optimizer
    step, the estimated peak memory at ``micro`` and the budget it was held against (MB), whether it fits, why."""

    micro: int
    accumulation: int
    estimate_mb: float | None
    budget_mb: float | None
    reason: str
    fits: bool = True

    def message(self, processes: int = 1) -> str:
        eff = self.micro * self.accumulation * processes
        return f"micro-batch {self.micro} x accumulation {self.accumulation} (effective batch {eff}), {self.reason}"


def given_micro_batch(t: TrainingSpec) -> MicroBatch | None:
    """The spec's micro-batch and accumulation when it sets either of them (a left-out one is today's default:
    micro-batch 8, accumulation 1); None when it leaves both out (then ``choose_micro_batch`` decides)."""
    if batch_left_out(t):
        return None
    micro, accumulation = batch_fields(t)
    if t.per_device_train_batch_size is None:
        why = f"training.gradient_accumulation_steps as set, micro-batch {DEFAULT_BATCH} (left out)"
    elif t.gradient_accumulation_steps is None:
        why = "training.per_device_train_batch_size as set, accumulation 1 (left out)"
    else:
        why = "as the spec sets them"
    return MicroBatch(micro, accumulation, None, None, why)


def choose_micro_batch(effective: int, estimate_mb: Callable[[int], float], budget_mb: float) -> MicroBatch:
    """The micro-batch when the spec leaves the batch out: the largest divisor of ``effective`` (per device: 8 gives
    8, 4, 2, 1) whose estimated peak memory ``estimate_mb(micro)`` fits ``budget_mb``, with accumulation
    ``effective / micro``, so the effective batch (and the learning) is unchanged. When not even 1 fits: 1, and a
    reason that says so and what to change (``fits`` False)."""
    candidates = [m for m in range(effective, 0, -1) if effective % m == 0]
    tried: list[tuple[int, float]] = []
    for micro in candidates:
        est = float(estimate_mb(micro))
        if est <= budget_mb:
            if tried:
                bigger, need = tried[-1]
                beyond = f"{bigger} would need {need:,.0f} MB"
            else:
                beyond = (
                    f"{2 * effective} would need {float(estimate_mb(2 * effective)):,.0f} MB and change the "
                    "effective batch (set training.per_device_train_batch_size to use it)"
                )
            why = f"chosen from the memory estimate: {est:,.0f} MB of a {budget_mb:,.0f} MB budget; {beyond}"
            return MicroBatch(micro, effective // micro, est, budget_mb, why)
        tried.append((micro, est))
    est = tried[-1][1]
    why = (
        f"chosen from the memory estimate, which exceeds the budget even at micro-batch 1: {est:,.0f} MB of a "
        f"{budget_mb:,.0f} MB budget; training may run out of memory: turn on training.gradient_checkpointing, "
        "lower training.max_length, or train with model.method: qlora"
    )
    return MicroBatch(1, effective, est, budget_mb, why, fits=False)


EAGER_MAX_LENGTH = 1024  # attention "auto": eager on a CPU up to this max_length


def attention_kernel(training: TrainingSpec, use_cuda: bool) -> str:
    """transformers' ``attn_implementation`` for training: the spec's choice, or for ``auto`` eager on a CPU when
    rows are at most ``EAGER_MAX_LENGTH`` tokens (faster than the CPU flash-attention backward there) and sdpa
    otherwise (eager's attention matrices grow with the length squared) and on CUDA."""
    if training.attention != "auto":
        return training.attention
    return "eager" if not use_cuda and training.max_length <= EAGER_MAX_LENGTH else "sdpa"


CUDA_ONLY_OPTIM = {"adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_lion_8bit"}


def check_optim(optim: str, use_cuda: bool) -> None:
    """The 8-bit and paged optimizers (bitsandbytes) run on CUDA only: stop early on a CPU, naming the fix."""
    if optim in CUDA_ONLY_OPTIM and not use_cuda:
        raise ValueError(
            f"training.optim: {optim} (bitsandbytes' paged / 8-bit optimizer) needs a CUDA GPU and none is "
            "available here; use adamw_torch (or adafactor for less optimizer memory)"
        )


def planned_steps(t: TrainingSpec, rows: int) -> int:
    """Optimizer steps of a run: ``max_steps``, or ``num_train_epochs`` passes over ``rows`` training rows at the
    effective batch (per-device batch x accumulation x processes), rounded up."""
    if t.max_steps is not None:
        return t.max_steps
    return max(1, math.ceil(float(t.num_train_epochs or 1) * math.ceil(rows / effective_batch(t))))


def warmup_steps(t: TrainingSpec, steps: int) -> int:
    """``warmup_steps`` when given, else ``warmup_ratio`` of the run's steps."""
    return min(steps, t.warmup_steps) if t.warmup_steps is not None else int(round(t.warmup_ratio * steps))


def budget_warmup_steps(t: TrainingSpec, planned: int, fit: int) -> int:
    """Warm-up when a time budget cuts the run from ``planned`` to ``fit`` steps: the same share of the steps that fit
    as the spec asked of the planned run (``warmup_ratio`` x fit; an explicit ``warmup_steps`` scaled by
    fit / planned), so that a budget-cut run does not spend a third of itself warming up."""
    if t.warmup_steps is not None:
        return min(fit, int(round(t.warmup_steps * fit / max(1, planned))))
    return int(round(t.warmup_ratio * fit))


def epoch_steps(t: TrainingSpec, rows: int) -> int:
    """Optimizer steps of one pass over ``rows`` training rows (or packed sequences) at the effective batch."""
    return max(1, math.ceil(rows / effective_batch(t)))
