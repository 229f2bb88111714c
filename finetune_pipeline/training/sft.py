"""Supervised fine-tuning with trl's SFTTrainer: LoRA (DoRA, rsLoRA), QLoRA (nf4 / int8) or full fine-tuning.

``train`` is a plain function: the adapter asset runs it in a child process (``finetune_pipeline.training.child``),
each sweep trial calls it in-process. It handles the loss mask (assistant turns via a chat template with generation
markers, or the final answer), packing / padding-free batches, checkpoints and resume, early stopping, the cost
record and the data-order record. Heavy imports stay inside functions.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune_pipeline.data.messages import to_prompt_completion
from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec

LogFn = Callable[[str], None]
TRAINING_OVERRIDABLE = {
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "warmup_ratio",
    "weight_decay",
}
COMPLETE = "CHECKPOINT_COMPLETE"  # written into a checkpoint folder once everything in it is on disk
DATA_ORDER = "data_order.jsonl"


@dataclass
class TrainRequest:
    base_path: str
    model: ModelSpec
    training: TrainingSpec
    train_messages: list[str]  # JSON-encoded message lists
    eval_messages: list[str]
    output_dir: Path
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    overrides: dict[str, Any] = field(default_factory=dict)  # sweep params: learning_rate, lora.r, ...
    max_steps: int | None = None  # overrides training.max_steps (sweep trials)
    save: bool = True
    checkpoint_dir: Path | None = None  # checkpoints every training.save_steps; resume from the last complete one
    spec_dir: str | None = None  # resolves a relative training.chat_template
    measure_cost: bool = False  # matmul peak, FLOP utilisation and the EOS check (the adapter asset turns it on)
    eos_max_new_tokens: int = 48

    def to_json(self) -> str:
        d = asdict(self)
        d["model"] = self.model.model_dump(mode="json")
        d["training"] = self.training.model_dump(mode="json")
        d["runtime"] = self.runtime.model_dump(mode="json")
        for k in ("output_dir", "checkpoint_dir"):
            d[k] = None if d[k] is None else str(d[k])
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> TrainRequest:
        d = json.loads(text)
        d["model"] = ModelSpec.model_validate(d["model"])
        d["training"] = TrainingSpec.model_validate(d["training"])
        d["runtime"] = RuntimeSpec.model_validate(d["runtime"])
        d["output_dir"] = Path(d["output_dir"])
        d["checkpoint_dir"] = Path(d["checkpoint_dir"]) if d.get("checkpoint_dir") else None
        return cls(**d)


@dataclass
class TrainResult:
    output_dir: str
    method: str
    steps: int
    loss_history: list[tuple[int, float]]
    eval_loss: float
    train_tokens: int  # non-padding tokens seen in this session
    wall_seconds: float
    tokens_per_second: float
    cpu_seconds: float  # CPU time of this process while training (all threads): robust to other load
    trainable_params: int
    total_params: int
    lora_tensors_changed: int
    lora_tensors_total: int
    params: dict[str, Any]
    resumed_from_step: int = 0
    stopped_early: bool = False
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"
    peak_memory_mb: float = 0.0
    estimated_seconds: float | None = None
    seconds_per_step: float | None = None
    flops_per_token: float = 0.0
    achieved_tflops: float = 0.0
    matmul_peak_tflops: float | None = None
    flop_utilisation: float | None = None
    chat_template_source: str = "model"
    eos_token: str = ""
    eos_rate: float | None = None
    eos_samples: list[dict[str, Any]] = field(default_factory=list)
    reproducibility: dict[str, Any] = field(default_factory=dict)
    num_processes: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def effective_params(training: TrainingSpec, model: ModelSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    p: dict[str, Any] = {k: getattr(training, k) for k in TRAINING_OVERRIDABLE}
    p.update({"lora.r": model.lora.r, "lora.alpha": model.lora.alpha, "lora.dropout": model.lora.dropout})
    p.update(overrides)
    return p


def last_complete_checkpoint(folder: Path | None) -> Path | None:
    """The newest ``checkpoint-N`` folder holding the completion marker; half-written ones are removed."""
    if folder is None or not folder.is_dir():
        return None
    found = []
    for d in folder.glob("checkpoint-*"):
        if d.is_dir() and d.name.split("-")[-1].isdigit():
            if (d / COMPLETE).exists():
                found.append((int(d.name.split("-")[-1]), d))
            else:
                shutil.rmtree(d, ignore_errors=True)  # killed while writing it
    return max(found)[1] if found else None


def _dataset(messages: list[str], assistant_only: bool) -> Any:
    from datasets import Dataset

    if assistant_only:
        return Dataset.from_list([{"messages": json.loads(m)} for m in messages])
    return Dataset.from_list([to_prompt_completion(m) for m in messages])


def _digest(t: Any) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:12]


def _trainer_class() -> Any:
    """SFTTrainer that records a digest of every micro-batch it trains on (the data-order record)."""
    from trl import SFTTrainer

    class RecordingSFTTrainer(SFTTrainer):
        order_file: Path | None = None
        session: int = 0

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            if self.order_file is not None and self.is_world_process_zero():
                line = {
                    "step": self.state.global_step + 1,
                    "batch": _digest(inputs["input_ids"]),
                    "resumed_from": self.session,
                }
                with self.order_file.open("a") as fh:  # written as it happens: a killed run's record survives
                    fh.write(json.dumps(line) + "\n")
            return super().training_step(model, inputs, num_items_in_batch)

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            if return_outputs or not self.model.training or not _lean_ok(self):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return _lean_loss(self, model, inputs, num_items_in_batch)

    return RecordingSFTTrainer


def _lean_ok(trainer: Any) -> bool:
    """The lean loss applies to one process, plain NLL, and models without logit scaling or soft-capping."""
    cfg = trainer.model.config.get_text_config()
    return (
        trainer.accelerator.num_processes == 1
        and trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and not trainer.aux_loss_enabled
        and trainer.args.loss_type == "nll"
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
        and getattr(cfg, "logits_scaling", None) is None
    )


def _lean_loss(trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> Any:
    """Training loss without trl's per-step extras: the LM head projects only the positions that carry a label
    (on CPU trl's fused head scores every position, prompt and padding included) and no full-vocabulary entropy is
    computed for the logs. Same value as trl's loss: summed answer-token NLL over ``num_items_in_batch``."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix)
    fwd = {k: v for k, v in inputs.items() if k != "labels"}
    fwd["use_cache"] = False
    hidden = backbone(**fwd).last_hidden_state[:, :-1]
    target = inputs["labels"][:, 1:]
    mask = target != -100
    head = base.get_output_embeddings()
    logits = head(hidden[mask].to(head.weight.device)).float()
    picked = target[mask].to(logits.device)
    nll = torch.nn.functional.cross_entropy(logits, picked, reduction="sum")
    denom = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = nll / torch.as_tensor(denom, device=nll.device).clamp(min=1)
    with torch.no_grad():
        acc = (logits.argmax(-1) == picked).float().mean().item() if picked.numel() else 0.0
    n_tok = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(inputs["input_ids"].numel())
    trainer._total_train_tokens += n_tok
    trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]
    trainer._metrics["train"]["mean_token_accuracy"].append(acc)
    return loss


def eos_check(model: Any, tok: Any, messages: list[str], max_new_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    """Greedy generations for a sample of prompts with the trained template: share that end with the EOS token."""
    import torch

    rows = [json.loads(m) for m in messages]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(model.parameters()).device
    samples: list[dict[str, Any]] = []
    was_training = model.training
    model.eval()
    for r in rows:
        ids = tok.apply_chat_template(r[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tok.eos_token_id,
            )
        new = out[0, len(ids) :].tolist()
        samples.append({"ended": tok.eos_token_id in new, "output": tok.decode(new, skip_special_tokens=True)[:200]})
    if was_training:
        model.train()
    return (sum(s["ended"] for s in samples) / len(samples) if samples else math.nan), samples


def train(
    req: TrainRequest,
    log: LogFn = print,
    extra_callbacks: list[Any] | None = None,
) -> TrainResult:
    """Train and (optionally) save the adapter or full model plus tokenizer and chat template to ``req.output_dir``."""
    import torch
    from transformers import EarlyStoppingCallback, PrinterCallback, TrainerCallback, set_seed
    from trl import SFTConfig

    from finetune_pipeline.models.base import load_model, load_tokenizer, lora_config, resolve_dtype
    from finetune_pipeline.training import cost, repro
    from finetune_pipeline.training.chat import resolve_chat_template

    t, rt = req.training, req.runtime
    params = effective_params(t, req.model, req.overrides)
    max_steps = req.max_steps or t.max_steps
    use_cuda = torch.cuda.is_available()
    device = "cuda" if use_cuda else "cpu"
    dtype = resolve_dtype(req.model.dtype)
    set_seed(t.seed)
    tok = load_tokenizer(req.base_path, req.model.trust_remote_code)
    spec_dir = Path(req.spec_dir) if req.spec_dir else None
    chat = resolve_chat_template(tok, t.chat_template, spec_dir, need_markers=t.assistant_only_loss)
    tok.chat_template = chat.template

    model = load_model(req.base_path, req.model, for_training=True)
    if req.model.method in ("lora", "qlora"):
        from peft import get_peft_model

        set_seed(t.seed)  # adapter initialisation is reproducible from the recorded seed
        model = get_peft_model(model, lora_config(req.model, req.overrides))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(
        f"training {req.model.method} in {dtype} on {device}: {trainable:,} trainable of {total:,} parameters, "
        f"{max_steps} steps"
    )
    peak = cost.measure_matmul_peak(dtype, device) if req.measure_cost else None
    if peak is not None:
        log(f"matmul peak in {dtype} on {device}: {peak.gflops:.0f} GFLOP/s")

    history: list[tuple[int, float]] = []
    eval_history: list[tuple[int, float]] = []
    calib: dict[str, float] = {}

    class _Progress(TrainerCallback):
        def __init__(self) -> None:
            self.t_last = time.perf_counter()
            self.tok_last = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t_last, self.tok_last = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                history.append((state.global_step, float(logs["loss"])))
                now, seen = time.perf_counter(), state.num_input_tokens_seen
                rate = (seen - self.tok_last) / max(now - self.t_last, 1e-9)
                self.t_last, self.tok_last = now, seen
                log(
                    f"step {state.global_step}/{max_steps} loss {logs['loss']:.4f} "
                    f"lr {logs.get('learning_rate', 0):.2e} {rate:.0f} tokens/s"
                )
            if "eval_loss" in logs:
                eval_history.append((state.global_step, float(logs["eval_loss"])))
                log(f"step {state.global_step} eval_loss {logs['eval_loss']:.4f}")

    class _MarkComplete(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.is_world_process_zero:
                d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if d.is_dir():
                    (d / COMPLETE).write_text(str(state.global_step))

    out = Path(req.output_dir)
    ckpt_dir = req.checkpoint_dir or (out / "trainer")
    resume = last_complete_checkpoint(req.checkpoint_dir) if rt.save_steps else None
    eval_ds = _dataset(req.eval_messages[: t.max_eval_samples], t.assistant_only_loss) if req.eval_messages else None
    do_eval = eval_ds is not None and t.eval_steps > 0
    saving = bool(req.checkpoint_dir and rt.save_steps)
    cfg = SFTConfig(
        output_dir=str(ckpt_dir),
        max_steps=max_steps,
        per_device_train_batch_size=int(params["per_device_train_batch_size"]),
        per_device_eval_batch_size=int(params["per_device_train_batch_size"]),
        gradient_accumulation_steps=int(params["gradient_accumulation_steps"]),
        learning_rate=float(params["learning_rate"]),
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=int(round(float(params["warmup_ratio"]) * max_steps)),
        weight_decay=float(params["weight_decay"]),
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
        bf16=dtype == "bfloat16" and use_cuda,  # CPU: weights already bf16, autocast would only add casts
        fp16=dtype == "float16" and use_cuda,
        gradient_checkpointing=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    callbacks: list[Any] = [_Progress(), _MarkComplete()]
    if rt.calibration_steps and max_steps > rt.calibration_steps + 1:
        callbacks.append(cost.make_calibration_callback(rt.calibration_steps, max_steps, log, calib))
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    trainer = _trainer_class()(
        model=model,
        args=cfg,
        train_dataset=_dataset(req.train_messages, t.assistant_only_loss),
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[*callbacks, *(extra_callbacks or [])],
    )
    resumed_from = int(resume.name.split("-")[-1]) if resume else 0
    if req.save:
        out.mkdir(parents=True, exist_ok=True)
        trainer.order_file, trainer.session = out / DATA_ORDER, resumed_from
    trainer.remove_callback(PrinterCallback)  # progress goes through `log` (the Dagster run log) instead
    if resume is not None:
        log(f"resuming from {resume.name}: global step, optimizer, scheduler, RNG and data position restored")
    t0, c0 = time.perf_counter(), time.process_time()
    if resume is not None and resumed_from >= max_steps:
        _load_final_checkpoint(trainer, resume, req.model.method)  # killed after its last step: nothing to train
        log(f"{resume.name} is the last step: loaded its weights, nothing left to train")
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    steps = int(trainer.state.global_step)
    tokens_total = int(trainer.state.num_input_tokens_seen)
    # tokens of this session: the state restored from a checkpoint already counts the steps before it
    tokens = tokens_total - _tokens_at(resume)
    if eval_ds is None:
        eval_loss = math.nan
    elif eval_history and eval_history[-1][0] == steps:
        eval_loss = eval_history[-1][1]  # the trainer just evaluated at the last step
    else:
        eval_loss = float(trainer.evaluate()["eval_loss"])
        log(f"final eval_loss {eval_loss:.4f}")
    stopped_early = bool(t.early_stopping_patience) and steps < max_steps
    if stopped_early:
        log(f"early stopping at step {steps}: validation loss stopped improving")
    changed = sum(int(not torch.equal(init[n], p.detach())) for n, p in trainer.model.named_parameters() if n in init)
    world_zero = trainer.is_world_process_zero()
    n_proc = int(trainer.accelerator.num_processes)
    avg_len = tokens / max(1, (steps - resumed_from) * int(params["per_device_train_batch_size"]) * n_proc)
    fpt = cost.train_flops_per_token(trainer.model, avg_len)
    achieved = fpt * tokens / wall / 1e12 if wall > 0 else 0.0
    eos_rate, eos_samples = math.nan, []
    if req.measure_cost and world_zero and rt.eos_check_samples and req.eval_messages:
        eos_rate, eos_samples = eos_check(
            trainer.model, tok, req.eval_messages[: rt.eos_check_samples], req.eos_max_new_tokens
        )
        log(f"EOS check: {eos_rate:.0%} of {len(eos_samples)} sampled generations end with {tok.eos_token!r}")
    if not req.checkpoint_dir:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if req.save and world_zero:
        out.mkdir(parents=True, exist_ok=True)
        trainer.model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)  # with the chat template it was trained with (chat_template.jinja)
        gen = trainer.model.generation_config
        gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
        gen.save_pretrained(out)
    result = TrainResult(
        output_dir=str(out),
        method=req.model.method,
        steps=steps,
        loss_history=history,
        eval_loss=eval_loss,
        train_tokens=tokens,
        wall_seconds=wall,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        cpu_seconds=cpu_s,
        trainable_params=int(trainable),
        total_params=int(total),
        lora_tensors_changed=changed,
        lora_tensors_total=len(init),
        params=params,
        resumed_from_step=resumed_from,
        stopped_early=stopped_early,
        eval_history=eval_history,
        dtype=dtype,
        device=device,
        peak_memory_mb=cost.peak_memory_mb(device),
        estimated_seconds=calib.get("estimated_seconds"),
        seconds_per_step=calib.get("seconds_per_step"),
        flops_per_token=fpt,
        achieved_tflops=achieved,
        matmul_peak_tflops=peak.gflops / 1e3 if peak else None,
        flop_utilisation=achieved / (peak.gflops / 1e3) if peak else None,
        chat_template_source=chat.source,
        eos_token=str(tok.eos_token),
        eos_rate=None if math.isnan(eos_rate) else eos_rate,
        eos_samples=eos_samples,
        reproducibility={
            "seeds": repro.seeds(t.seed),
            "libraries": repro.library_versions(),
            "hardware": repro.hardware(),
        },
        num_processes=n_proc,
    )
    if req.save and world_zero:
        (out / "train_result.json").write_text(result.to_json())
    del trainer, model
    if use_cuda:
        torch.cuda.empty_cache()
    return result


def _tokens_at(checkpoint: Path | None) -> int:
    if checkpoint is None or not (checkpoint / "trainer_state.json").exists():
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def _load_final_checkpoint(trainer: Any, ckpt: Path, method: str) -> None:
    """Weights and state of a checkpoint written at the last step (``Trainer.train`` would run one step too many)."""
    from safetensors.torch import load_file
    from transformers import TrainerState

    if method in ("lora", "qlora"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, load_file(ckpt / "adapter_model.safetensors"))
    else:
        trainer.model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
