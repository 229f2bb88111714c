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
    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.trial.report(float(metrics["eval_loss"]), state.global_step)
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {state.global_step}")
