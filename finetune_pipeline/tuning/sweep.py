"""Optuna hyperparameter search: each trial a short training run scored by validation loss.

The study lives in persistent storage under a name the caller computes (from the data and the search settings,
e.g. by hashing ``trial_training``'s output), so a re-run with unchanged inputs finds its trials already done, and
an interrupted sweep continues where it stopped. Each trial trains ``spec.with_overrides(params)``; the sweep
reports every finished trial through ``on_trial`` and imports no tracking library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_pipeline.spec import PipelineSpec, SearchParam, SweepSpec, TrainingSpec
from finetune_pipeline.training.sft import TrainRequest, train

LogFn = Callable[[str], None]


@dataclass
class SweepResult:
    study_name: str
    best_params: dict[str, Any]
    best_value: float
    n_complete: int
    n_pruned: int
    n_run_now: int
    trials: list[dict[str, Any]]


@dataclass(frozen=True)
class TrialReport:
    """One finished trial, for the caller to record (MLflow, logs). A pruned or failed trial has no eval_loss,
    tokens_per_second or loss history."""

    number: int
    params: dict[str, Any]
    state: Literal["COMPLETE", "PRUNED", "FAIL"]
    eval_loss: float | None = None
    tokens_per_second: float | None = None
    loss_history: list[tuple[int, float]] = field(default_factory=list)


def trial_training(training: TrainingSpec, sweep: SweepSpec) -> TrainingSpec:
    """The training settings of every trial: ``sweep.max_steps`` steps, validation twice (feeds the pruner), and
    an equal share of ``sweep.max_minutes`` as the trial's time budget. The spec's own max_steps / num_train_epochs /
    max_minutes / eval_steps do not reach a trial."""
    every = max(1, sweep.max_steps // 2)
    minutes = sweep.max_minutes / sweep.n_trials if sweep.max_minutes else None
    return TrainingSpec.model_validate(
        {
            **training.model_dump(mode="json"),
            "max_steps": sweep.max_steps,
            "num_train_epochs": None,
            "max_minutes": minutes,
            "eval_steps": every,
        }
    )


def suggest(trial: Any, name: str, p: SearchParam) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
    return trial.suggest_float(name, float(p.low), float(p.high), log=p.log)  # type: ignore[arg-type]


def run_sweep(
    *,
    study_name: str,
    base_path: str,
    spec: PipelineSpec,
    train_messages: list[str],
    val_messages: list[str],
    storage_uri: str,
    work_dir: Path,
    log: LogFn = print,
    on_trial: Callable[[TrialReport], None] | None = None,
) -> SweepResult:
    import optuna

    from finetune_pipeline.tuning.pruning import PruneOnEval

    sweep = spec.sweep
    if storage_uri.startswith("sqlite:///"):
        Path(storage_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_uri,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=sweep.seed),
        pruner=pruner,
        load_if_exists=True,
    )
    finished = [
        t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    remaining = max(0, sweep.n_trials - len(finished))
    log(f"study {study_name}: {len(finished)} trial(s) already done, running {remaining}")
    report = on_trial or (lambda r: None)

    def objective(trial: Any) -> float:
        params = {k: suggest(trial, k, p) for k, p in sweep.search_space.items()}
        log(f"trial {trial.number}: {params}")
        trial_spec = spec.with_overrides(params)
        req = TrainRequest(
            base_path=base_path,
            model=trial_spec.model,
            training=trial_training(trial_spec.training, sweep),
            runtime=spec.runtime,
            train_messages=train_messages,
            eval_messages=val_messages,
            output_dir=work_dir / f"trial-{trial.number}",
            save=False,
        )
        try:
            res = train(req, log=lambda m: log(f"trial {trial.number}: {m}"), extra_callbacks=[PruneOnEval(trial)])
        except optuna.TrialPruned:
            log(f"trial {trial.number}: pruned")
            report(TrialReport(trial.number, params, "PRUNED"))
            raise
        except Exception:
            report(TrialReport(trial.number, params, "FAIL"))
            raise
        if math.isnan(res.eval_loss):
            report(TrialReport(trial.number, params, "FAIL", None, res.tokens_per_second, res.loss_history))
            raise ValueError("trial produced no validation loss: the validation split is empty")
        report(TrialReport(trial.number, params, "COMPLETE", res.eval_loss, res.tokens_per_second, res.loss_history))
        return res.eval_loss

    if remaining:
        study.optimize(objective, n_trials=remaining, gc_after_trial=True)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"sweep {study_name}: no trial completed; see the trial logs above")
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, **{f"param.{k}": v for k, v in t.params.items()}}
        for t in study.trials
    ]
    return SweepResult(
        study_name=study_name,
        best_params=dict(study.best_trial.params),
        best_value=float(study.best_value),
        n_complete=len(complete),
        n_pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        n_run_now=remaining,
        trials=trials,
    )
