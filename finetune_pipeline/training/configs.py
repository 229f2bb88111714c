"""Pure translators from the spec to the libraries' config objects, in the trl style: plain spec sections in,
peft ``LoraConfig`` / trl ``SFTConfig`` out. Sweep parameters are already applied to the spec
(``PipelineSpec.with_overrides``), so nothing here knows about overrides. Heavy imports stay inside the functions.

The base model's quantization config lives with the model loading (``models.base.quantization_config``).
"""

from __future__ import annotations

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
) -> Any:
    """trl ``SFTConfig`` for one run.

    ``output_dir``: where the trainer writes checkpoints; ``use_cuda``: train on the GPU; ``dtype``: the resolved
    weight dtype (bf16 / fp16 autocast only on CUDA: on CPU the weights are already in that dtype and autocast
    would only add casts); ``do_eval``: evaluate every ``training.eval_steps``; ``saving``: checkpoint every
    ``runtime.save_steps``.
    """
    from trl import SFTConfig

    t, rt = training, runtime
    return SFTConfig(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=int(round(t.warmup_ratio * t.max_steps)),
        weight_decay=t.weight_decay,
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
        gradient_checkpointing=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
