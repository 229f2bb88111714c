"""Supervised fine-tuning with trl's SFTTrainer: LoRA (DoRA, rsLoRA), QLoRA (nf4 / int8) or full fine-tuning.

``train`` reads top to bottom: ``setup`` (tokenizer and chat template, model and adapter, data, trainer), ``fit``
(train or resume, then the validation loss), ``finalize`` (cost figures, EOS check, the saved model and its
record). The adapter asset runs it in a child process (``finetune_pipeline.training.child``), each sweep trial
calls it in-process. A request carries the final model / training / runtime settings: sweep parameters are
applied to the spec before (``PipelineSpec.with_overrides``). Heavy imports stay inside functions; the trainer
and its callbacks live in ``training.trainer`` and ``training.callbacks``, imported by ``setup``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_pipeline.data.messages import to_prompt_completion
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import RuntimeSpec, TrainingSpec
from finetune_pipeline.training.checkpoints import (
    disk_full_explained,
    last_usable_checkpoint,
    load_final_checkpoint,
    tokens_at,
)
from finetune_pipeline.training.records import DATA_ORDER, RESULT_FILE, TrainRequest, TrainResult

__all__ = ["TrainRequest", "TrainResult", "train", "setup", "fit", "finalize", "eos_check", "last_complete_checkpoint"]


@dataclass
class Session:
    """What ``setup`` builds for ``fit`` and ``finalize``."""

    req: TrainRequest
    log: LogFn
    trainer: Any
    tok: Any
    chat_source: str
    dtype: str
    use_cuda: bool
    init: dict[str, Any]  # the adapter's initial tensors, to count those training changed
    trainable: int
    total: int
    progress: Any  # callbacks.Progress: the loss curves
    ckpt_dir: Path
    resume: Path | None
    has_eval: bool
    peak: Any = None  # cost.MatmulPeak when measured
    calib: dict[str, float] = field(default_factory=dict)
    steps: int = 0  # the planned step count (max_steps, or from num_train_epochs)
    dtype_choice: Any = None  # hardware.DtypeChoice
    contract: Any = None  # contract.ContractReport
    keep_best: Any = None  # callbacks.KeepBest when validating during training
    memory: dict[str, float] = field(default_factory=dict)
    batch: Any = None  # configs.MicroBatch: the micro-batch and accumulation used, and why

    @property
    def device(self) -> str:
        return "cuda" if self.use_cuda else "cpu"

    @property
    def resumed_from(self) -> int:
        return int(self.resume.name.split("-")[-1]) if self.resume else 0


@dataclass(frozen=True)
class Fitted:
    """What ``fit`` measured: steps and tokens of this session, its time, the final validation loss."""

    steps: int
    tokens: int
    wall_seconds: float
    cpu_seconds: float
    eval_loss: float
    stopped_early: bool
    best_step: int | None = None


def train(req: TrainRequest, log: LogFn = print, extra_callbacks: list[Any] | None = None) -> TrainResult:
    """Train and (optionally) save the adapter or full model plus tokenizer and chat template to ``req.output_dir``."""
    with disk_full_explained(req.checkpoint_dir, Path(req.output_dir)):
        session = setup(req, log, extra_callbacks)
        fitted = fit(session)
        return finalize(session, fitted)


def setup(req: TrainRequest, log: LogFn = print, extra_callbacks: list[Any] | None = None) -> Session:
    """Tokenizer and chat template, model with its adapter, datasets and the trainer with its callbacks."""
    import torch
    from transformers import PrinterCallback, set_seed

    from finetune_pipeline.models.base import load_tokenizer
    from finetune_pipeline.models.hardware import choose_dtype
    from finetune_pipeline.training import contract, cost
    from finetune_pipeline.training.chat import resolve_chat_template
    from finetune_pipeline.training.configs import (
        batch_fields,
        check_optim,
        default_learning_rate,
        effective_batch,
        epoch_steps,
        planned_steps,
        sft_config,
        warmup_steps,
    )
    from finetune_pipeline.training.trainer import RecordingSFTTrainer

    t, rt = req.training, req.runtime
    use_cuda = torch.cuda.is_available()
    check_optim(t.optim, use_cuda)
    choice = choose_dtype(req.model.dtype, req.model.allow_slow_dtype)  # stops here on a dtype the CPU cannot run
    dtype = choice.dtype
    speeds = ", ".join(f"{k} {v:.1f}" for k, v in choice.gflops.items())
    log(f"dtype {dtype} ({choice.reason})" + (f"; matmul GFLOP/s measured here: {speeds}" if speeds else ""))
    set_seed(t.seed)
    tok = load_tokenizer(req.base_path, req.model.trust_remote_code)
    spec_dir = Path(req.spec_dir) if req.spec_dir else None
    chat = resolve_chat_template(tok, t.chat_template, spec_dir, need_markers=t.assistant_only_loss)
    chat.install(tok)  # the template, and its end-of-turn token as EOS
    model = _model(req, dtype)
    if t.learning_rate is None:  # the rule's rate, from the model's size, the method and the effective batch
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        params = base.num_parameters() - adapter  # the model's own (4-bit weights counted unpacked)
        lr = default_learning_rate(params, req.model.method, effective_batch(t))
        log(
            f"learning rate {lr:.3g}: training.learning_rate left out, chosen for {params:,} "
            f"parameters, {req.model.method}, effective batch {effective_batch(t)} (default_learning_rate)"
        )
        t = t.model_copy(update={"learning_rate": lr})
    spec_training = t  # the batch fields as the spec gives them (both left out: chosen below from the memory estimate)
    micro, accumulation = batch_fields(t)  # provisional 8 x 1 when both are left out
    t = t.model_copy(update={"per_device_train_batch_size": micro, "gradient_accumulation_steps": accumulation})
    req = req.model_copy(update={"training": t})
    init = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    device = "cuda" if use_cuda else "cpu"
    train_ds = _dataset(req.train_messages, t.assistant_only_loss)
    steps = planned_steps(t, len(req.train_messages))
    log(
        f"training {req.model.method} in {dtype} on {device}: {trainable:,} trainable of {total:,} parameters, "
        f"{steps} steps, {model.config._attn_implementation} attention"
        + (f" ({t.num_train_epochs:g} epochs of {len(req.train_messages)} rows)" if t.num_train_epochs else "")
    )
    peak = cost.measure_matmul_peak(dtype, device) if req.measure_cost else None
    if peak is not None:
        log(f"matmul peak in {dtype} on {device}: {peak.gflops:.0f} GFLOP/s")
    out = Path(req.output_dir)
    ckpt_dir = req.checkpoint_dir or (out / "trainer")
    resume = last_usable_checkpoint(req.checkpoint_dir, log) if rt.save_steps else None
    eval_ds = _dataset(req.eval_messages[: t.max_eval_samples], t.assistant_only_loss) if req.eval_messages else None
    do_eval = eval_ds is not None and t.eval_steps > 0
    saving = bool(req.checkpoint_dir and rt.save_steps)
    cfg = sft_config(
        t, rt, output_dir=str(ckpt_dir), use_cuda=use_cuda, dtype=dtype, do_eval=do_eval, saving=saving, steps=steps
    )
    progress, calib, callbacks, keep_best = _callbacks(t, rt, log, steps, do_eval)
    trainer = RecordingSFTTrainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[*callbacks, *(extra_callbacks or [])],
    )
    if t.packing and t.num_train_epochs:  # epochs count packed sequences
        steps = planned_steps(t, len(trainer.train_dataset))
        trainer.args.max_steps, progress.max_steps = steps, steps
        trainer.args.warmup_steps = warmup_steps(t, steps)
        for cb in callbacks:
            if hasattr(cb, "max_steps"):
                cb.max_steps = steps
    calib["epoch_steps"] = epoch_steps(t, len(trainer.train_dataset))  # the budget's epochs, the epochs trained
    report = contract.check_trainer_dataset(trainer, tok, len(req.train_messages), t.packing)
    log(f"end-of-turn check on the tokenised training rows: {report.message()}")
    if not report.passed:
        raise contract.EndOfTurnContractError(f"training stopped before its first step: {report.message()}")
    loss_share = _loss_share(trainer)

    def estimate(m: int) -> dict[str, float]:  # the estimated peak at a micro-batch of m rows
        at = t.model_copy(update={"per_device_train_batch_size": m})
        return cost.estimate_memory(
            trainer.model, req.model, at, dtype, device, _batch_tokens(trainer.train_dataset, t, m), loss_share
        )

    batch = _micro_batch(trainer, spec_training, resume, device, lambda m: estimate(m)["total_mb"], req)
    log(("warning: " if not batch.fits else "") + batch.message(t.num_processes))
    if (batch.micro, batch.accumulation) != (micro, accumulation):  # the trainer was built with the provisional 8 x 1
        args = trainer.args
        args.per_device_train_batch_size = args.per_device_eval_batch_size = batch.micro
        args.gradient_accumulation_steps = batch.accumulation
        trainer._train_batch_size = args.train_batch_size  # what the trainer's dataloader reads
        t = t.model_copy(
            update={"per_device_train_batch_size": batch.micro, "gradient_accumulation_steps": batch.accumulation}
        )
        req = req.model_copy(update={"training": t})
    memory = estimate(batch.micro)
    log(
        f"estimated peak memory {memory['total_mb']:.0f} MB ("
        + ", ".join(f"{k.removesuffix('_mb')} {v:.0f}" for k, v in memory.items() if k != "total_mb")
        + " MB)"
    )
    session = Session(
        req,
        log,
        trainer,
        tok,
        chat.source,
        dtype,
        use_cuda,
        init,
        trainable,
        total,
        progress,
        ckpt_dir,
        resume,
        has_eval=eval_ds is not None,
        peak=peak,
        calib=calib,
        steps=steps,
        dtype_choice=choice,
        contract=report,
        keep_best=keep_best,
        memory=memory,
        batch=batch,
    )
    if req.save_outputs:
        out.mkdir(parents=True, exist_ok=True)
        trainer.order_file, trainer.session = out / DATA_ORDER, session.resumed_from
    trainer.share_prefix = t.share_prefix
    trainer.remove_callback(PrinterCallback)  # progress goes through `log` (the Dagster run log) instead
    return session


def fit(session: Session) -> Fitted:
    """Train the planned steps (resuming from the last complete checkpoint), then keep the best validation
    checkpoint's weights when validating during training, and the validation loss."""
    trainer, resume, log, t = session.trainer, session.resume, session.log, session.req.training
    if resume is not None:
        log(f"resuming from {resume.name}: global step, optimizer, scheduler, RNG and data position restored")
    t0, c0 = time.perf_counter(), time.process_time()
    if resume is not None and session.resumed_from >= session.steps:
        load_final_checkpoint(trainer, resume, session.req.model.method)  # killed after its last step
        log(f"{resume.name} is the last step: loaded its weights, nothing left to train")
    else:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    steps = int(trainer.state.global_step)
    # tokens of this session: the state restored from a checkpoint already counts the steps before it
    tokens = int(trainer.state.num_input_tokens_seen) - tokens_at(resume)
    eval_history = session.progress.eval_history
    best_step = None
    if not session.has_eval:
        eval_loss = math.nan
    else:
        if eval_history and eval_history[-1][0] == steps:
            eval_loss = eval_history[-1][1]  # the trainer just evaluated at the last step
        else:
            eval_loss = float(trainer.evaluate()["eval_loss"])  # KeepBest sees this evaluation too
            log(f"final eval_loss {eval_loss:.4f}")
        keep = session.keep_best
        if keep is not None and keep.best_step is not None:
            best_step = keep.restore(trainer.model, steps)
            eval_loss = keep.best_loss
            if best_step != steps:
                log(f"kept the weights of step {best_step}: best validation loss {keep.best_loss:.4f}")
    if trainer.prefix_tokens_saved:
        log(f"shared prefix: {trainer.prefix_tokens_saved:,} of {tokens:,} tokens computed once per batch, not per row")
    budget = session.calib.get("budget_steps")
    stopped_early = bool(t.early_stopping_patience) and steps < (budget or session.steps)
    if stopped_early:
        log(f"early stopping at step {steps}: validation loss stopped improving")
    return Fitted(steps, tokens, wall, cpu_s, eval_loss, stopped_early, best_step)


def finalize(session: Session, fitted: Fitted) -> TrainResult:
    """Changed adapter tensors, cost figures, the EOS check; the model, tokenizer and ``train_result.json`` saved."""
    import torch

    from finetune_pipeline.training import repro

    req, trainer, tok, log = session.req, session.trainer, session.tok, session.log
    init = session.init
    changed = sum(  # the trainer may have moved the model (to CUDA) since the snapshot
        int(not torch.equal(init[n], p.detach().to(init[n].device)))
        for n, p in trainer.model.named_parameters()
        if n in init
    )
    world_zero = trainer.is_world_process_zero()
    eos_rate, eos_samples = math.nan, []
    if req.measure_cost and world_zero and req.runtime.eos_check_samples and req.eval_messages:
        eos_rate, eos_samples = eos_check(
            trainer.model, tok, req.eval_messages[: req.runtime.eos_check_samples], req.eos_max_new_tokens
        )
        log(f"EOS check: {eos_rate:.0%} of {len(eos_samples)} sampled generations end with {tok.eos_token!r}")
    if not req.checkpoint_dir:
        shutil.rmtree(session.ckpt_dir, ignore_errors=True)
    out = Path(req.output_dir)
    if req.save_outputs and world_zero:
        _save_model(trainer, tok, out)
    result = TrainResult(
        output_dir=str(out),
        method=req.model.method,
        steps=fitted.steps,
        loss_history=session.progress.history,
        eval_loss=fitted.eval_loss,
        train_tokens=fitted.tokens,
        wall_seconds=fitted.wall_seconds,
        tokens_per_second=fitted.tokens / fitted.wall_seconds if fitted.wall_seconds > 0 else 0.0,
        cpu_seconds=fitted.cpu_seconds,
        trainable_params=int(session.trainable),
        total_params=int(session.total),
        lora_tensors_changed=changed,
        lora_tensors_total=len(session.init),
        resumed_from_step=session.resumed_from,
        stopped_early=fitted.stopped_early,
        eval_history=session.progress.eval_history,
        chat_template_source=session.chat_source,
        eos_token=str(tok.eos_token),
        eos_rate=None if math.isnan(eos_rate) else eos_rate,
        eos_samples=eos_samples,
        planned_steps=session.steps,
        epochs_trained=fitted.steps / session.calib["epoch_steps"] if session.calib.get("epoch_steps") else None,
        budget_epochs=session.calib.get("budget_epochs"),
        budget_warmup_steps=None
        if "budget_warmup_steps" not in session.calib
        else int(session.calib["budget_warmup_steps"]),
        budget_steps=None if session.calib.get("budget_steps") is None else int(session.calib["budget_steps"]),
        dtype_choice=session.dtype_choice.as_metadata() if session.dtype_choice else {},
        eot_contract=session.contract.as_metadata() if session.contract else {},
        best_step=fitted.best_step,
        memory_estimate_mb=session.memory,
        micro_batch=req.training.per_device_train_batch_size,
        gradient_accumulation_steps=req.training.gradient_accumulation_steps,
        micro_batch_reason=session.batch.reason if session.batch else "",
        memory_budget_mb=session.batch.budget_mb if session.batch else None,
        reproducibility={
            "seeds": repro.seeds(req.training.seed),
            "libraries": repro.library_versions(),
            "hardware": repro.hardware(),
        },
        **_cost_figures(session, fitted),
    )
    if req.save_outputs and world_zero:
        result.save(out / RESULT_FILE)
    session.trainer = None  # release the model before the next run (a sweep trains many in one process)
    del trainer
    if session.use_cuda:
        torch.cuda.empty_cache()
    return result


def _callbacks(
    t: TrainingSpec, rt: RuntimeSpec, log: LogFn, steps: int, do_eval: bool
) -> tuple[Any, dict[str, float], list[Any], Any]:
    """Progress (the loss curves), the checkpoint completion marker, the calibration (its estimate and the time
    budget's step count written into the returned dict), the NaN / divergence guard, the best-checkpoint keeper and
    early stopping."""
    from transformers import EarlyStoppingCallback

    from finetune_pipeline.training.callbacks import Calibrate, KeepBest, MarkComplete, NanGuard, Progress
    from finetune_pipeline.training.configs import budget_warmup_steps

    progress, calib = Progress(steps, log), {}
    callbacks: list[Any] = [progress, MarkComplete()]
    n_calib = min(rt.calibration_steps, steps - 2)
    if n_calib >= 1:
        budget = t.max_minutes * 60 if t.max_minutes else None
        warm = lambda planned, fit: budget_warmup_steps(t, planned, fit)  # noqa: E731
        callbacks.append(Calibrate(n_calib, steps, log, calib, budget, progress, warmup_for=warm))
    elif t.max_minutes:
        log(f"training.max_minutes: {steps} steps are too few to calibrate (needs 3): the budget is not applied")
    if t.nan_guard:
        callbacks.append(NanGuard())
    keep_best = KeepBest() if do_eval else None
    if keep_best is not None:
        callbacks.append(keep_best)
    if t.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(t.early_stopping_patience, t.early_stopping_threshold))
    return progress, calib, callbacks, keep_best


def _batch_tokens(ds: Any, t: TrainingSpec, micro: int) -> float:
    """Padded length of a training micro-batch of ``micro`` rows: the longest row, the largest over the data (the
    peak comes from the longest batch); packed or padding-free, the mean of the ``micro`` longest rows."""
    lengths = [len(r) for r in ds["input_ids"]] if len(ds) else [0]
    if t.packing or t.padding_free:
        return sum(sorted(lengths)[-micro:]) / micro
    return float(max(lengths))


def _micro_batch(
    trainer: Any, spec_training: TrainingSpec, resume: Path | None, device: str, estimate_mb: Any, req: TrainRequest
) -> Any:
    """The micro-batch and accumulation (``configs.MicroBatch``): the spec's when it sets either; else the one of
    the checkpoint being resumed (the same batches as the interrupted run); else ``choose_micro_batch`` against the
    request's ``memory_budget_mb`` or the machine's (``cost.memory_budget_mb``), the smallest any process chose."""
    from finetune_pipeline.training import cost
    from finetune_pipeline.training.configs import MicroBatch, batch_fields, choose_micro_batch, given_micro_batch

    given = given_micro_batch(spec_training)
    if given is not None:
        return given
    micro, accumulation = batch_fields(spec_training)
    per_device = micro * accumulation
    kept = _checkpoint_micro_batch(resume, max(1, int(trainer.args.n_gpu)))
    if kept and per_device % kept == 0:
        return MicroBatch(kept, per_device // kept, estimate_mb(kept), None, f"kept from {resume.name} (resumed)")
    budget = req.memory_budget_mb if req.memory_budget_mb is not None else cost.memory_budget_mb(device)
    if budget is None:
        return MicroBatch(micro, accumulation, None, None, "the default: this machine does not report its free memory")
    choice = choose_micro_batch(per_device, estimate_mb, budget)
    acc = trainer.accelerator
    if acc.num_processes > 1:  # each process measured its own memory: all must step alike
        import torch

        agreed = int(acc.gather(torch.tensor([choice.micro], device=acc.device)).min())
        if agreed < choice.micro:
            est = estimate_mb(agreed)
            why = f"the smallest any process chose (here {choice.micro}): {est:,.0f} MB of a {budget:,.0f} MB budget"
            choice = MicroBatch(agreed, per_device // agreed, est, budget, why)
    return choice


def _checkpoint_micro_batch(resume: Path | None, n_gpu: int = 1) -> int | None:
    """The micro-batch the checkpoint being resumed trained with (the trainer state's ``train_batch_size``, which
    counts the GPUs of one process's DataParallel)."""
    if resume is None:
        return None
    try:
        return int(json.loads((resume / "trainer_state.json").read_text())["train_batch_size"]) // n_gpu or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _loss_share(trainer: Any) -> float:
    """Share of the training tokens that carry loss (the lean loss projects only those onto the vocabulary); 1.0 when
    the trainer computes the full logits."""
    from finetune_pipeline.training.trainer import lean_ok

    ds = trainer.train_dataset
    if "labels" not in ds.column_names or not lean_ok(trainer):
        return 1.0
    labels = ds["labels"]
    total = sum(len(r) for r in labels)
    return sum(sum(1 for x in r if x != -100) for r in labels) / total if total else 1.0


def _model(req: TrainRequest, dtype: str) -> Any:
    """The base model in the chosen dtype, with a fresh adapter for lora / qlora (initialised reproducibly from the
    training seed)."""
    import torch
    from transformers import set_seed

    from finetune_pipeline.models.base import load_model
    from finetune_pipeline.training.configs import attention_kernel, lora_config

    model = load_model(req.base_path, req.model.model_copy(update={"dtype": dtype}), for_training=True)
    model.set_attn_implementation(attention_kernel(req.training, torch.cuda.is_available()))
    if req.model.method in ("lora", "qlora"):
        from peft import get_peft_model

        set_seed(req.training.seed)  # adapter initialisation is reproducible from the recorded seed
        model = get_peft_model(model, lora_config(req.model.lora))
        from finetune_pipeline.training.speed import adapter_in_half_precision, half_precision_lora

        if adapter_in_half_precision(req.model.method, req.training):
            half_precision_lora(model, dtype, "cuda" if next(model.parameters()).is_cuda else "cpu")
    return model


def _cost_figures(session: Session, fitted: Fitted) -> dict[str, Any]:
    """dtype, device, processes, peak memory, FLOPs per token, achieved TFLOP/s against the matmul peak, and the
    calibration's time estimate."""
    from finetune_pipeline.training import cost

    trainer, peak = session.trainer, session.peak
    n_proc = int(trainer.accelerator.num_processes)
    batch = session.req.training.per_device_train_batch_size  # resolved in setup
    avg_len = fitted.tokens / max(1, (fitted.steps - session.resumed_from) * batch * n_proc)
    fpt = cost.train_flops_per_token(trainer.model, avg_len)
    computed = fitted.tokens - trainer.prefix_tokens_saved  # a shared prefix counts once (training.prefix)
    achieved = fpt * computed / fitted.wall_seconds / 1e12 if fitted.wall_seconds > 0 else 0.0
    return {
        "learning_rate": session.req.training.learning_rate,
        "dtype": session.dtype,
        "device": session.device,
        "num_processes": n_proc,
        "peak_memory_mb": cost.peak_memory_mb(session.device),
        "estimated_seconds": session.calib.get("estimated_seconds"),
        "seconds_per_step": session.calib.get("seconds_per_step"),
        "flops_per_token": fpt,
        "prefix_tokens_saved": trainer.prefix_tokens_saved,
        "achieved_tflops": achieved,
        "matmul_peak_tflops": peak.gflops / 1e3 if peak else None,
        "flop_utilisation": achieved / (peak.gflops / 1e3) if peak else None,
    }


def _save_model(trainer: Any, tok: Any, out: Path) -> None:
    """The adapter (or full model), the tokenizer with the chat template it was trained with, and the generation
    config ending at the template's EOS token."""
    out.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)  # with the chat template it was trained with (chat_template.jinja)
    gen = trainer.model.generation_config
    gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    gen.save_pretrained(out)


def last_complete_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint that reads back whole (training.checkpoints.last_usable_checkpoint)."""
    return last_usable_checkpoint(folder)


def _dataset(messages: list[str], assistant_only: bool) -> Any:
    from datasets import Dataset

    if assistant_only:
        return Dataset.from_list([{"messages": json.loads(m)} for m in messages])
    return Dataset.from_list([to_prompt_completion(m) for m in messages])


def eos_check(model: Any, tok: Any, messages: list[str], max_new_tokens: int) -> tuple[float, list[dict[str, Any]]]:
    """Greedy generations for a sample of prompts with the trained template, made as evaluation and the served model
    make them (``generate_answers``): the share that end with the EOS token, and the samples."""
    from finetune_pipeline.models.chat_generation import generate_answers

    was_training = model.training
    model.eval()
    answers, ended = generate_answers(model, tok, [json.loads(m)[:-1] for m in messages], max_new_tokens)
    if was_training:
        model.train()
    samples = [{"ended": e, "output": a[:200]} for a, e in zip(answers, ended, strict=True)]
    return (sum(ended) / len(ended) if ended else math.nan), samples
