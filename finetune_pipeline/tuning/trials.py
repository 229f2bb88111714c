"""One sweep trial as its own child process: the request it reads, what it leaves behind, and the code it runs.

The parent (``sweep.run_sweep``) asks Optuna for a trial, writes a ``TrialRequest`` and starts
``python -m finetune_pipeline.tuning.trial_child REQUEST`` (through Dagster Pipes, like the adapter). The child loads
the study from the shared storage, reports every validation loss to its trial (the pruner decides there, across
processes) and writes a ``TrialOutcome``; the parent then tells the study. No tracking library here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from finetune_pipeline.layout import Record
from finetune_pipeline.spec import EvaluationSpec
from finetune_pipeline.training.records import TrainRequest

CHILD_MODULE = "finetune_pipeline.tuning.trial_child"
OUTCOME_FILE = "trial_outcome.json"


class TrialRequest(Record):
    """What a trial child needs: where the study lives, which trial it is, and what to train."""

    study_name: str
    storage_uri: str
    trial_id: int  # Optuna's id of the trial in the storage (not its number)
    number: int
    params: dict[str, object]
    pruner: str  # sweep.pruner: the child builds the same pruner (Optuna does not store it with the study)
    train: TrainRequest
    objective: str = "eval_loss"  # or a per-row metric of the evaluation settings (then maximised or minimised)
    objective_samples: int = 32
    evaluation: EvaluationSpec | None = None  # the metric's settings (json schema, custom metrics, max_new_tokens)


class TrialOutcome(Record):
    """What a trial child leaves in its folder: how the trial ended, its validation loss and curves."""

    number: int
    state: Literal["COMPLETE", "PRUNED", "FAIL"]
    eval_loss: float | None = None
    value: float | None = None  # the objective: eval_loss, or the task metric on the validation rows
    tokens_per_second: float | None = None
    steps: int = 0
    loss_history: list[tuple[int, float]] = []
    error: str = ""
    started: float = 0.0  # wall clock (time.time()) when training began and ended in the child
    ended: float = 0.0


def make_pruner(kind: str) -> Any:
    """The study's pruner; parent and trial children build the same one (Optuna does not store it)."""
    import optuna

    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    return optuna.pruners.NopPruner()


def run_trial(req: TrialRequest, log: Callable[[str], None] = print) -> TrialOutcome:
    """Train one trial, reporting validation losses to its Optuna trial; pruned when the study's pruner says so."""
    import optuna

    from finetune_pipeline.training.sft import train
    from finetune_pipeline.tuning.pruning import PruneOnEval

    study = optuna.load_study(study_name=req.study_name, storage=req.storage_uri, pruner=make_pruner(req.pruner))
    trial = optuna.trial.Trial(study, req.trial_id)
    maximise = study.direction == optuna.study.StudyDirection.MAXIMIZE
    prune = PruneOnEval(trial, sign=-1.0 if maximise else 1.0)
    started = time.time()
    try:
        res = train(req.train, log=log, extra_callbacks=[prune])
    except optuna.TrialPruned as exc:
        log(f"pruned: {exc}")
        return TrialOutcome(
            number=req.number, state="PRUNED", steps=prune.last_step, started=started, ended=time.time()
        )
    if math.isnan(res.eval_loss):
        msg = "the trial produced no validation loss: the validation split is empty"
        return TrialOutcome(number=req.number, state="FAIL", error=msg, steps=res.steps)
    value = res.eval_loss if req.objective == "eval_loss" else objective_metric(req, log)
    return TrialOutcome(
        number=req.number,
        state="COMPLETE",
        eval_loss=res.eval_loss,
        value=value,
        tokens_per_second=res.tokens_per_second,
        steps=res.steps,
        loss_history=res.loss_history,
        started=started,
        ended=time.time(),
    )


def objective_metric(req: TrialRequest, log: Callable[[str], None]) -> float:
    """The task metric of the trained trial: greedy answers on the first ``objective_samples`` validation rows,
    scored per row with the evaluation's metric table (the adapter was saved in the trial's folder)."""
    import json

    from finetune_pipeline.evaluation.metrics import row_function
    from finetune_pipeline.models.base import load_trained
    from finetune_pipeline.models.chat_generation import generate_answers

    ev = req.evaluation
    if ev is None:
        raise ValueError(f"objective {req.objective} needs the evaluation settings in the trial request")
    rows = [json.loads(m) for m in req.train.eval_messages[: req.objective_samples]]
    model, tok = load_trained(req.train.base_path, req.train.model, str(req.train.output_dir))
    answers, _ = generate_answers(model, tok, [r[:-1] for r in rows], ev.max_new_tokens, batch_size=ev.batch_size)
    fn = row_function(req.objective, ev)
    scores = [fn(a, r[-1]["content"]) for a, r in zip(answers, rows, strict=True)]  # type: ignore[misc]
    value = sum(scores) / len(scores)
    log(f"{req.objective} on {len(rows)} validation rows: {value:.4f}")
    return value


def outcome_path(request: Path) -> Path:
    return request.with_name(OUTCOME_FILE)
