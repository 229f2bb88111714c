"""The sweep's pruning callback: reports each validation loss to its Optuna trial and stops the trial when the
pruner says so.

This module imports transformers and optuna at import time: import it only inside functions that train, as
``sweep.run_sweep`` does.
"""

from __future__ import annotations

from typing import Any

import optuna
from transformers import TrainerCallback


class PruneOnEval(TrainerCallback):
    """Reports each validation loss to the trial (its storage is shared, so the pruner compares with the other
    trials, in this process or another) and stops the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial, sign: float = 1.0) -> None:
        self.trial = trial
        self.sign = sign  # -1 when the study maximises a task metric: the reported value is then -loss
        self.history: list[tuple[int, float]] = []  # (step, validation loss) reported so far
        self.last_step = 0

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.last_step = int(state.global_step)
            self.history.append((self.last_step, float(metrics["eval_loss"])))
            self.trial.report(self.sign * float(metrics["eval_loss"]), state.global_step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {state.global_step}")
