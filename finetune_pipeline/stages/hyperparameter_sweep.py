"""hyperparameter_sweep: an Optuna study over the spec's search space, each trial a nested MLflow run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_pipeline import keys
from finetune_pipeline.hashing import short_hash
from finetune_pipeline.layout import PipelineLayout, SweepRecord
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.datasets import log_splits
from finetune_pipeline.tracking.mlflow_store import Lineage
from finetune_pipeline.tracking.tracker import Tracker
from finetune_pipeline.training.launch import ChildLaunch

CODE = __name__  # its code version: the trials it runs (keys.STAGE_CODE)


@dataclass
class SweepOutcome:
    record: SweepRecord
    reused: bool
    trials_run_now: int
    experiment: str
    plots: dict[str, bytes]  # optimisation history, parameter importances (PNG)
    trial_steps: int = 0

    @property
    def data_version(self) -> str:
        return short_hash(self.record.study, self.record.best_params)


def current_study(layout: PipelineLayout, spec: LoadedSpec) -> str:
    """The study name for the current splits, base weights, training code and search settings."""
    return keys.sweep_study(spec.name, layout.read_manifest(), layout.read_base(), spec.spec, keys.code_version(CODE))


def finished_sweep(layout: PipelineLayout, spec: LoadedSpec) -> SweepRecord | None:
    """The stored sweep when it was run for the current data and settings, else None."""
    if not layout.sweep_record.exists():
        return None
    rec = SweepRecord.load(layout.sweep_record)
    return rec if rec.study == current_study(layout, spec) else None


def sweep(
    layout: PipelineLayout,
    spec: LoadedSpec,
    storage_uri: str,
    tracker: Tracker,
    lineage: Lineage,
    launch: Callable[[ChildLaunch], dict[str, Any]] | None = None,
    log: LogFn = print,
) -> SweepOutcome:
    """Run (or reuse) the study; trials already in the storage count toward sweep.n_trials. Each trial trains in a
    child process started by ``launch`` (the asset passes its Dagster Pipes launch; default: a plain subprocess)."""
    from finetune_pipeline.plots import study_plots
    from finetune_pipeline.tuning.sweep import TrialReport, run_sweep, subprocess_launch

    exp = tracker.experiment_id
    done = finished_sweep(layout, spec)
    if done is not None:
        log(f"sweep {done.study} already finished for this data (MLflow run {done.mlflow_run_id}): reusing it")
        return SweepOutcome(done, True, 0, exp, study_plots(done.study, storage_uri))
    manifest, base, frames = layout.read_manifest(), layout.read_base(), layout.read_split_frames()
    name = current_study(layout, spec)

    def on_trial(t: TrialReport) -> None:
        metrics = {"eval_loss": t.eval_loss, "tokens_per_second": t.tokens_per_second}
        tracker.log_trial(parent.run_id, lineage, t.number, t.params, t.state, metrics, t.loss_history, name)

    with tracker.run("sweep", lineage) as parent:
        log_splits(parent, layout, spec, frames, manifest.digests, ["train", "validation"])
        res = run_sweep(
            study_name=name,
            base_path=base.path,
            spec=spec.spec,
            train_messages=list(frames["train"]["messages"]),
            val_messages=list(frames["validation"]["messages"]),
            storage_uri=storage_uri,
            work_dir=layout.sweep,
            log=log,
            on_trial=on_trial,
            launch=launch or subprocess_launch,
        )
        parent.log_metrics({f"best_{spec.sweep.objective}": res.best_value})
        parent.log_params({f"best.{p}": v for p, v in res.best_params.items()})
        parent.set_tags({"optuna.study": res.study_name})
    rec = SweepRecord(
        study=res.study_name,
        best_params=res.best_params,
        best_value=res.best_value,
        mlflow_run_id=parent.run_id,
        data_version=manifest.version,
        trials_complete=res.n_complete,
        trials_pruned=res.n_pruned,
        trials=res.trials,
    )
    rec.save(layout.sweep_record)
    return SweepOutcome(rec, False, res.n_run_now, exp, study_plots(rec.study, storage_uri), res.trial_steps)
