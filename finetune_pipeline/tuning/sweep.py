"""Optuna hyperparameter search: each trial a short training run scored by validation loss.

The study lives in persistent storage and is named after the data and the search settings, so a re-run with
unchanged inputs finds its trials already done, and an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_pipeline.spec import ModelSpec, SearchParam, SweepSpec, TrainingSpec
from finetune_pipeline.tracking import mlflow_store
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


TRIAL_OVERRIDES = {"max_steps", "eval_steps"}  # set by the sweep itself, not part of its identity


def study_name(pipeline: str, data_digest: str, sweep: SweepSpec, model: ModelSpec, training: TrainingSpec) -> str:
    blob = json.dumps(
        [
            sweep.model_dump(mode="json"),
            model.model_dump(mode="json"),
            training.model_dump(mode="json", exclude=TRIAL_OVERRIDES),
        ],
        sort_keys=True,
    )
    return f"{pipeline}-{data_digest}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def suggest(trial: Any, name: str, p: SearchParam) -> Any:
    if p.type == "categorical":
        return trial.suggest_categorical(name, p.choices)
    if p.type == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
    return trial.suggest_float(name, float(p.low), float(p.high), log=p.log)  # type: ignore[arg-type]


def run_sweep(
    *,
    pipeline: str,
    base_path: str,
    model: ModelSpec,
    training: TrainingSpec,
    sweep: SweepSpec,
    train_messages: list[str],
    val_messages: list[str],
    storage_uri: str,
    data_digest: str,
    work_dir: Path,
    log: LogFn = print,
    mlflow_experiment: str | None = None,
    lineage: mlflow_store.Lineage | None = None,
) -> SweepResult:
    import optuna
    from transformers import TrainerCallback

    if storage_uri.startswith("sqlite:///"):
        Path(storage_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    name = study_name(pipeline, data_digest, sweep, model, training)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
        if sweep.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=name,
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
    log(f"study {name}: {len(finished)} trial(s) already done, running {remaining}")
    eval_every = max(1, sweep.max_steps // 2)  # two validation points per trial feed the pruner
    trial_training = training.model_copy(update={"eval_steps": eval_every})

    class _Prune(TrainerCallback):
        def __init__(self, trial: Any):
            self.trial = trial

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any
        ) -> None:
            if metrics and "eval_loss" in metrics:
                self.trial.report(float(metrics["eval_loss"]), state.global_step)
                if self.trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {state.global_step}")

    def objective(trial: Any) -> float:
        params = {k: suggest(trial, k, p) for k, p in sweep.search_space.items()}
        log(f"trial {trial.number}: {params}")
        ctx = (
            mlflow_store.run(
                mlflow_experiment,
                f"trial-{trial.number}",
                lineage,
                nested=True,
                **{"optuna.study": name, "optuna.trial": str(trial.number)},
            )
            if mlflow_experiment and lineage
            else contextlib.nullcontext()
        )
        with ctx:
            if mlflow_experiment:
                import mlflow

                mlflow.log_params(params)
            try:
                res = train(
                    TrainRequest(
                        base_path=base_path,
                        model=model,
                        training=trial_training,
                        train_messages=train_messages,
                        eval_messages=val_messages,
                        output_dir=work_dir / f"trial-{trial.number}",
                        overrides=params,
                        max_steps=sweep.max_steps,
                        save=False,
                    ),
                    log=lambda m: log(f"trial {trial.number}: {m}"),
                    extra_callbacks=[_Prune(trial)],
                )
            except optuna.TrialPruned:
                if mlflow_experiment:
                    import mlflow

                    mlflow.set_tag("optuna.state", "PRUNED")
                log(f"trial {trial.number}: pruned")
                raise
            if mlflow_experiment:
                import mlflow

                for step, loss in res.loss_history:
                    mlflow.log_metric("train_loss", loss, step=step)
                mlflow.log_metrics({"eval_loss": res.eval_loss, "tokens_per_second": res.tokens_per_second})
                mlflow.set_tag("optuna.state", "COMPLETE")
        if math.isnan(res.eval_loss):
            raise ValueError("trial produced no validation loss: the validation split is empty")
        return res.eval_loss

    if remaining:
        study.optimize(objective, n_trials=remaining, gc_after_trial=True)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError(f"sweep {name}: no trial completed; see the trial logs above")
    trials = [
        {"number": t.number, "state": t.state.name, "value": t.value, **{f"param.{k}": v for k, v in t.params.items()}}
        for t in study.trials
    ]
    return SweepResult(
        study_name=name,
        best_params=dict(study.best_trial.params),
        best_value=float(study.best_value),
        n_complete=len(complete),
        n_pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        n_run_now=remaining,
        trials=trials,
    )
