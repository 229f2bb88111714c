"""Optuna hyperparameter search: each trial a short training run scored by validation loss.

The study lives in persistent storage under a name the caller computes (from the data and the search settings,
e.g. by hashing ``trial_training``'s output), so a re-run with unchanged inputs finds its trials already done, and
an interrupted sweep continues where it stopped. Each trial trains ``spec.with_overrides(params)``; the sweep
reports every finished trial through ``on_trial`` and imports no tracking library.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import PipelineSpec, SearchParam, SweepSpec, TrainingSpec
from finetune_pipeline.training.launch import ChildLaunch
from finetune_pipeline.training.records import TrainRequest
from finetune_pipeline.tuning.trials import CHILD_MODULE as TRIAL_CHILD
from finetune_pipeline.tuning.trials import TrialOutcome, TrialRequest, make_pruner, outcome_path


@dataclass
class SweepResult:
    study_name: str
    best_params: dict[str, Any]
    best_value: float
    n_complete: int
    n_pruned: int
    n_run_now: int
    trials: list[dict[str, Any]]
    trial_steps: int = 0  # training steps all trials of the study spent (pruned ones stop early)


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
    """The training settings of every trial: ``sweep.max_steps`` steps, validation every ``sweep.eval_steps`` (default
    twice; feeds the pruner), and an equal share of ``sweep.max_minutes`` (times the trials running at once) as the
    trial's time budget. The spec's own max_steps / num_train_epochs / max_minutes / eval_steps do not reach a trial."""
    every = sweep.eval_steps or max(1, sweep.max_steps // 2)
    minutes = sweep.max_minutes * sweep.parallel_trials / sweep.n_trials if sweep.max_minutes else None
    return TrainingSpec.model_validate(
        {
            **training.model_dump(mode="json"),
            "max_steps": sweep.max_steps,
            "num_train_epochs": None,
            "max_minutes": minutes,
            "eval_steps": every,
        }
    )


def objective_direction(spec: PipelineSpec) -> str:
    """minimize for the validation loss, else the task metric's own direction."""
    if spec.sweep.objective == "eval_loss":
        return "minimize"
    from finetune_pipeline.evaluation.metrics import higher_is_better

    return "maximize" if higher_is_better(spec.sweep.objective, spec.evaluation) else "minimize"


def subprocess_launch(how: ChildLaunch) -> dict[str, Any]:
    """Runs a child as a plain subprocess (library callers without Dagster); the asset passes its Pipes launch."""
    import os
    import subprocess

    subprocess.run(how.command, check=False, env={**os.environ, **(how.env or {})})
    return {}


def in_process_launch(how: ChildLaunch) -> dict[str, Any]:
    """Runs a trial in this process (``trial_child.main`` on its request): no interpreter start and no imports to pay
    per trial, for tests and debugging, one trial at a time. A crash takes the caller down with it."""
    from finetune_pipeline.tuning.trial_child import main

    main([how.extras["request"]])
    return {}


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
    launch: Callable[[ChildLaunch], dict[str, Any]] = subprocess_launch,
) -> SweepResult:
    """Run the study's missing trials, ``sweep.parallel_trials`` at a time, each in its own child process.

    Trials already finished in the storage count toward ``sweep.n_trials``; trials left RUNNING by a sweep that was
    killed are marked FAIL and their parameters are tried again."""
    import optuna

    sweep = spec.sweep
    if storage_uri.startswith("sqlite:///"):
        Path(storage_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_uri,
        direction=objective_direction(spec),
        sampler=optuna.samplers.TPESampler(seed=sweep.seed, constant_liar=sweep.parallel_trials > 1),
        pruner=make_pruner(sweep.pruner),
        load_if_exists=True,
    )
    _retry_interrupted(study, log)
    done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = max(0, sweep.n_trials - len(study.get_trials(states=done_states)))
    log(
        f"study {study_name}: {sweep.n_trials - remaining} trial(s) already done, running {remaining}, "
        f"{sweep.parallel_trials} at a time"
    )
    report = on_trial or (lambda r: None)
    # trials running at once share the CPU cores instead of each taking all of them (no effect on a GPU's work)
    per_trial = max(1, (os.cpu_count() or 1) // sweep.parallel_trials)
    threads = {"OMP_NUM_THREADS": str(per_trial)} if sweep.parallel_trials > 1 else None

    def start(trial: Any) -> tuple[Any, TrialOutcome]:
        params = {k: trial.params[k] for k in sweep.search_space}
        trial_spec = spec.with_overrides(params)
        folder = work_dir / f"trial-{trial.number}"
        req = TrialRequest(
            study_name=study_name,
            storage_uri=storage_uri,
            trial_id=trial._trial_id,
            number=trial.number,
            params=params,
            pruner=sweep.pruner,
            objective=sweep.objective,
            objective_samples=sweep.objective_samples,
            evaluation=spec.evaluation,
            train=TrainRequest(
                base_path=base_path,
                model=trial_spec.model,
                training=trial_training(trial_spec.training, sweep),
                runtime=spec.runtime,
                train_messages=train_messages,
                eval_messages=val_messages,
                output_dir=folder,
                save=sweep.objective != "eval_loss",  # a metric objective generates with the trained adapter
            ),
        )
        path = req.save(folder / "trial_request.json")
        outcome_path(path).unlink(missing_ok=True)
        launch(ChildLaunch([sys.executable, "-m", TRIAL_CHILD, str(path)], {"request": str(path)}, env=threads))
        if not outcome_path(path).exists():
            return trial, TrialOutcome(
                number=trial.number, state="FAIL", error="the trial child ended without an outcome"
            )
        return trial, TrialOutcome.load(outcome_path(path))

    with ThreadPoolExecutor(max_workers=sweep.parallel_trials) as pool:
        pending: set[Any] = set()
        asked = 0
        deadline = time.monotonic() + 60 * sweep.max_minutes if sweep.max_minutes else None
        while (asked < remaining and not _past(deadline)) or pending:
            while asked < remaining and len(pending) < sweep.parallel_trials and not _past(deadline):
                trial = study.ask({k: _distribution(p) for k, p in sweep.search_space.items()})
                log(f"trial {trial.number}: {trial.params}")
                pending.add(pool.submit(start, trial))
                asked += 1
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                trial, out = f.result()
                _tell(study, trial, out, log)
                report(
                    TrialReport(
                        trial.number,
                        dict(trial.params),
                        out.state,
                        out.eval_loss,
                        out.tokens_per_second,
                        out.loss_history,
                    )
                )
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
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
        n_run_now=asked,
        trials=trials,
        trial_steps=sum(int(t.user_attrs.get("steps", 0)) for t in study.trials),
    )


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _retry_interrupted(study: Any, log: LogFn) -> None:
    """Trials a killed sweep left RUNNING are marked FAIL, and their parameters queued to be tried again."""
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
        log(
            f"trial {t.number} was interrupted (left running by an earlier sweep): marked failed, parameters queued again"
        )


def _tell(study: Any, trial: Any, out: TrialOutcome, log: LogFn) -> None:
    import optuna

    trial.set_user_attr("steps", out.steps)
    if out.state == "COMPLETE":
        study.tell(trial, out.value if out.value is not None else out.eval_loss)
        extra = "" if out.value is None or out.value == out.eval_loss else f", objective {out.value:.4f}"
        log(f"trial {trial.number}: eval_loss {out.eval_loss:.4f}{extra} after {out.steps} steps")
    elif out.state == "PRUNED":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log(f"trial {trial.number}: pruned at step {out.steps}")
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log(f"trial {trial.number}: failed: {out.error}")


def _distribution(p: SearchParam) -> Any:
    import optuna

    if p.type == "categorical":
        return optuna.distributions.CategoricalDistribution(p.choices)  # type: ignore[arg-type]
    if p.type == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)  # type: ignore[arg-type]
    return optuna.distributions.FloatDistribution(float(p.low), float(p.high), log=p.log)  # type: ignore[arg-type]
