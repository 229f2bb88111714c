"""The trainer callbacks of a training run: progress into the run log, the checkpoint completion marker, and the
time estimate from the first steps.

This module imports transformers at import time (the callbacks subclass ``TrainerCallback``): import it only
inside functions that train, as ``sft.setup`` does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_pipeline.progress import LogFn
from finetune_pipeline.training.records import COMPLETE


class Progress(TrainerCallback):
    """Records the loss curves (``history``, ``eval_history``: (step, loss)) and logs each logged step with its
    learning rate and tokens/s since the previous log."""

    def __init__(self, max_steps: int, log: LogFn) -> None:
        self.max_steps = max_steps
        self.log = log
        self.history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []
        self.t_last = time.perf_counter()
        self.tok_last = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t_last, self.tok_last = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        logs = logs or {}
        if "loss" in logs:
            self.history.append((state.global_step, float(logs["loss"])))
            now, seen = time.perf_counter(), state.num_input_tokens_seen
            rate = (seen - self.tok_last) / max(now - self.t_last, 1e-9)
            self.t_last, self.tok_last = now, seen
            self.log(
                f"step {state.global_step}/{self.max_steps} loss {logs['loss']:.4f} "
                f"lr {logs.get('learning_rate', 0):.2e} {rate:.0f} tokens/s"
            )
        if "eval_loss" in logs:
            self.eval_history.append((state.global_step, float(logs["eval_loss"])))
            self.log(f"step {state.global_step} eval_loss {logs['eval_loss']:.4f}")


class MarkComplete(TrainerCallback):
    """Writes the completion marker into a checkpoint folder once the trainer has saved it."""

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.is_world_process_zero:
            d = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if d.is_dir():
                (d / COMPLETE).write_text(str(state.global_step))


class Calibrate(TrainerCallback):
    """Times the first ``steps`` steps after a warm-up step, then logs the run's estimated time before the long part
    starts. Writes ``seconds_per_step`` and ``estimated_seconds`` into ``sink``.

    With a time budget (``training.max_minutes``) it turns the budget into a step count there and then: the steps
    that fit in what is left of the budget at the measured pace (``budget_steps`` in ``sink``). When that is fewer
    than planned, training stops at that step and the learning-rate schedule is rescaled to end there: warm-up is
    ``warmup_for(planned, fit)`` (the spec's share of the steps that fit, not of the planned ones) and a linear or cosine
    decay reaches its end instead of being cut off mid-way. With ``epoch_steps`` in ``sink`` (optimizer steps of one
    pass over the training rows) it also logs how many epochs the budget covers (``budget_epochs``)."""

    def __init__(
        self,
        steps: int,
        max_steps: int,
        log: LogFn,
        sink: dict[str, float],
        budget_seconds: float | None = None,
        progress: Progress | None = None,
        warmup_for: Callable[[int, int], int] | None = None,
    ) -> None:
        self.steps = steps
        self.max_steps = max_steps
        self.log = log
        self.sink = sink
        self.budget_seconds = budget_seconds
        self.progress = progress
        self.warmup_for = warmup_for
        self.stop_at: int | None = None
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
        elif done == self.steps + 1:
            per_step = (time.perf_counter() - self.t_first) / self.steps
            remaining = self.max_steps - state.global_step
            elapsed = time.perf_counter() - self.t_begin
            self.sink["seconds_per_step"] = per_step
            self.sink["estimated_seconds"] = elapsed + per_step * remaining
            self.log(
                f"calibration: {per_step:.2f} s/step over {self.steps} steps -> estimated "
                f"{self.sink['estimated_seconds']:.0f} s for the run's {self.max_steps - self.first_step} steps "
                f"({remaining} to go, evaluation not included)"
            )
            if self.budget_seconds is not None:
                self._apply_budget(args, state, per_step, elapsed, kw.get("lr_scheduler"))
        if self.stop_at is not None and state.global_step >= self.stop_at:
            control.should_training_stop = True

    def _apply_budget(self, args: Any, state: Any, per_step: float, elapsed: float, scheduler: Any) -> None:
        fit = budget_steps(self.budget_seconds or 0.0, elapsed, per_step, state.global_step, self.max_steps)
        self.sink["budget_steps"] = fit
        minutes = (self.budget_seconds or 0.0) / 60
        epoch_steps = self.sink.get("epoch_steps")
        epochs = ""
        if epoch_steps:
            self.sink["budget_epochs"] = min(fit, self.max_steps) / epoch_steps
            epochs = (
                f"; the budget covers {self.sink['budget_epochs']:.2f} epochs (one epoch = {epoch_steps:.0f} steps, "
                f"about {epoch_steps * per_step / 60:.1f} min at this pace)"
            )
        if fit >= self.max_steps:
            self.log(f"time budget {minutes:g} min: all {self.max_steps} steps fit{epochs}")
            return
        self.stop_at = fit
        self.sink["estimated_seconds"] = elapsed + per_step * (fit - state.global_step)
        if self.progress is not None:
            self.progress.max_steps = fit
        warm = self.warmup_for(self.max_steps, fit) if self.warmup_for is not None else int(args.get_warmup_steps(fit))
        self.sink["budget_warmup_steps"] = warm
        self.log(
            f"time budget {minutes:g} min: {fit} of the planned {self.max_steps} steps fit at {per_step:.2f} s/step; "
            f"training stops at step {fit} (learning-rate schedule rescaled to end there, warm-up {warm} steps)"
            + epochs
        )
        if scheduler is not None:
            rescale_schedule(scheduler, args.lr_scheduler_type, warm, fit)


def budget_steps(budget_seconds: float, elapsed: float, per_step: float, done: int, planned: int) -> int:
    """Steps that fit in a time budget: those done plus what the rest of the budget buys at ``per_step``
    (at least one more than done, at most ``planned``)."""
    more = int((budget_seconds - elapsed) // per_step) if per_step > 0 else planned
    return max(done + 1, min(planned, done + more))


def rescale_schedule(scheduler: Any, schedule_type: Any, warmup: int, total_steps: int) -> None:
    """Point a LambdaLR learning-rate schedule at a new total step count and warm-up (same schedule type)."""
    import torch
    from transformers import get_scheduler

    warm = max(0, min(int(warmup), total_steps))
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fresh = get_scheduler(schedule_type, probe, num_warmup_steps=warm, num_training_steps=total_steps)
    if hasattr(scheduler, "lr_lambdas") and hasattr(fresh, "lr_lambdas"):
        scheduler.lr_lambdas = [fresh.lr_lambdas[0]] * len(scheduler.lr_lambdas)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN / inf or diverged: the run stops instead of finishing broken."""


def diverged(losses: list[float], factor: float = 4.0) -> str | None:
    """Why a loss curve counts as broken (None when it does not): the last loss is NaN / inf, or it is above the
    first loss and more than ``factor`` x the lowest loss seen."""
    if not losses:
        return None
    last = losses[-1]
    if not math.isfinite(last):
        return f"the training loss became {last}"
    if len(losses) >= 3 and last > losses[0] and last > factor * min(losses):
        return f"the training loss diverged: {last:.4f}, above the first ({losses[0]:.4f}) and > {factor:g}x the lowest ({min(losses):.4f})"
    return None


class NanGuard(TrainerCallback):
    """Stops the run with ``TrainingDiverged`` when the logged training loss turns NaN / inf or diverges."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            why = diverged(self.losses)
            if why is not None:
                raise TrainingDiverged(
                    f"step {state.global_step}: {why}. Lower training.learning_rate, keep training.max_grad_norm on "
                    "(e.g. 1.0), or check the data; the run is stopped instead of saving a broken model"
                )


class KeepBest(TrainerCallback):
    """Keeps a copy of the trainable weights at the best validation loss so far (on the CPU; for LoRA only the
    adapter); ``restore`` puts them back at the end of the run. No extra checkpoints on disk."""

    def __init__(self) -> None:
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.state: dict[str, Any] = {}
        self.model: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.model = model

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        loss = (metrics or {}).get("eval_loss")
        model = kw.get("model") or self.model
        if loss is None or model is None or not math.isfinite(loss) or loss >= self.best_loss:
            return
        self.best_loss, self.best_step = float(loss), int(state.global_step)
        self.state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model: Any, last_step: int) -> int | None:
        """Load the best weights into ``model`` (when the best is not the last step); the step kept."""
        import torch

        if self.best_step is None:
            return None
        if self.best_step != last_step:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in self.state:
                        p.copy_(self.state[n].to(p.device))
        return self.best_step
