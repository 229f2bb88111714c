"""Supervised fine-tuning with trl's SFTTrainer: LoRA, QLoRA or full, loss on the assistant answer only.

Heavy imports stay inside functions. ``train`` is a plain function: the adapter asset and each sweep trial call it.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_pipeline.data.split import to_prompt_completion
from finetune_pipeline.spec import ModelSpec, TrainingSpec

LogFn = Callable[[str], None]
TRAINING_OVERRIDABLE = {
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
}


@dataclass
class TrainRequest:
    base_path: str
    model: ModelSpec
    training: TrainingSpec
    train_messages: list[str]  # JSON-encoded message lists
    eval_messages: list[str]
    output_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # sweep params: learning_rate, lora.r, ...
    max_steps: int | None = None  # overrides training.max_steps (sweep trials)
    save: bool = True


@dataclass
class TrainResult:
    output_dir: str
    method: str
    steps: int
    loss_history: list[tuple[int, float]]
    eval_loss: float
    train_tokens: int  # non-padding tokens seen
    wall_seconds: float
    tokens_per_second: float
    trainable_params: int
    total_params: int
    lora_tensors_changed: int
    lora_tensors_total: int
    params: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _dataset(messages: list[str]) -> Any:
    from datasets import Dataset

    recs = [to_prompt_completion(m) for m in messages]
    return Dataset.from_list(recs)


def effective_params(training: TrainingSpec, model: ModelSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {k: getattr(training, k) for k in TRAINING_OVERRIDABLE}
    p.update({"lora.r": model.lora.r, "lora.alpha": model.lora.alpha, "lora.dropout": model.lora.dropout})
    p.update(overrides)
    return p


def train(
    req: TrainRequest,
    log: LogFn = print,
    extra_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train and (optionally) save the adapter or full model plus tokenizer to ``req.output_dir``."""
    import torch
    from transformers import TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    from finetune_pipeline.models.base import load_model, load_tokenizer, lora_config

    t = req.training
    params = effective_params(t, req.model, req.overrides)
    max_steps = req.max_steps or t.max_steps
    use_cuda = torch.cuda.is_available()
    set_seed(t.seed)
    tok = load_tokenizer(req.base_path, req.model.trust_remote_code)
    model = load_model(req.base_path, req.model, for_training=True)
    if req.model.method in ("lora", "qlora"):
        from peft import get_peft_model

        set_seed(t.seed)  # adapter initialisation is reproducible from the recorded seed
        model = get_peft_model(model, lora_config(req.model, req.overrides))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"training {req.model.method}: {trainable:,} trainable of {total:,} parameters, {max_steps} steps")

    history: list[tuple[int, float]] = []
    eval_losses: list[float] = []
    eval_at: list[int] = []

    class _Progress(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                history.append((state.global_step, float(logs["loss"])))
                log(
                    f"step {state.global_step}/{max_steps} loss {logs['loss']:.4f} lr {logs.get('learning_rate', 0):.2e}"
                )
            if "eval_loss" in logs:
                eval_losses.append(float(logs["eval_loss"]))
                eval_at.append(state.global_step)
                log(f"step {state.global_step} eval_loss {logs['eval_loss']:.4f}")

    out = Path(req.output_dir)
    eval_ds = _dataset(req.eval_messages[: t.max_eval_samples]) if req.eval_messages else None
    cfg = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=max_steps,
        per_device_train_batch_size=int(params["per_device_train_batch_size"]),
        per_device_eval_batch_size=int(params["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(params["gradient_accumulation_steps"]),
        learning_rate=float(params["learning_rate"]),
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=int(round(float(params["warmup_ratio"]) * max_steps)),
        weight_decay=float(params["weight_decay"]),
        max_length=t.max_length,
        packing=t.packing,
        completion_only_loss=t.completion_only_loss,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (eval_ds is not None and t.eval_steps) else "no",
        eval_steps=t.eval_steps or None,
        save_strategy="no",
        report_to=[],
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=not use_cuda,
        bf16=req.model.dtype == "bfloat16",
        fp16=False,
        gradient_checkpointing=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model,
        args=cfg,
        train_dataset=_dataset(req.train_messages),
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[_Progress(), *(extra_callbacks or [])],
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # progress goes through `log` (the Dagster run log) instead
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    if eval_ds is None:
        eval_loss = math.nan
    elif eval_losses and eval_at and eval_at[-1] == trainer.state.global_step:
        eval_loss = eval_losses[-1]  # the trainer just evaluated at the last step
    else:
        eval_loss = float(trainer.evaluate()["eval_loss"])
        log(f"final eval_loss {eval_loss:.4f}")
    tokens = int(trainer.state.num_input_tokens_seen)
    changed = sum(int(not torch.equal(init[n], p.detach())) for n, p in trainer.model.named_parameters() if n in init)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    if req.save:
        out.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
    result = TrainResult(
        output_dir=str(out),
        method=req.model.method,
        steps=int(trainer.state.global_step),
        loss_history=history,
        eval_loss=eval_loss,
        train_tokens=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        trainable_params=int(trainable),
        total_params=int(total),
        lora_tensors_changed=changed,
        lora_tensors_total=len(init),
        params=params,
    )
    if req.save:
        (out / "train_result.json").write_text(result.to_json())
    del trainer, model
    if use_cuda:
        torch.cuda.empty_cache()
    return result
