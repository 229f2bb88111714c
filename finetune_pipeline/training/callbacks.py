"""The trainer callbacks of a training run: progress into the run log, the checkpoint completion marker, and the
time estimate from the first steps.

This module imports transformers at import time (the callbacks subclass ``TrainerCallback``): import it only
inside functions that train, as ``sft.setup`` does.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from finetune_pipeline.training.sft import COMPLETE, LogFn


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
    starts. Writes ``seconds_per_step`` and ``estimated_seconds`` into ``sink``."""

    def __init__(self, steps: int, max_steps: int, log: LogFn, sink: dict[str, float]) -> None:
        self.steps = steps
        self.max_steps = max_steps
        self.log = log
        self.sink = sink
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
