"""adapter: train (or reuse) the fine-tuned adapter in a child process, record its lineage and cost."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune_pipeline import keys
from finetune_pipeline.layout import AdapterRecord, PipelineLayout
from finetune_pipeline.plots import loss_curve
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import LoadedSpec, PipelineSpec
from finetune_pipeline.stages.datasets import log_splits
from finetune_pipeline.stages.hyperparameter_sweep import finished_sweep
from finetune_pipeline.tracking.mlflow_store import Lineage
from finetune_pipeline.tracking.tracker import RunLog, Tracker
from finetune_pipeline.training.launch import PID_FILE, ChildLaunch, child_launch
from finetune_pipeline.training.records import RESULT_FILE, TrainRequest, TrainResult

# Starts the training child and waits for it -> the metadata the child reported (through Dagster Pipes).
Launch = Callable[[ChildLaunch], dict[str, Any]]
CODE = (__name__,)  # its code version: the training child it runs (keys.STAGE_CODE)


@dataclass
class AdapterOutcome:
    record: AdapterRecord
    result: TrainResult
    reused: bool
    experiment: str
    fingerprint: str  # of the data and spec now (the schedule compares it with the next one)

    def loss_png(self, title: str) -> bytes | None:
        return loss_curve(self.result.loss_history, self.result.eval_history, title)


def tuned_spec(layout: PipelineLayout, spec: LoadedSpec) -> tuple[PipelineSpec, str]:
    """The spec with the sweep's best parameters applied (when the sweep is on), and the sweep's MLflow run."""
    if not spec.sweep.enabled:
        return spec.spec, ""
    done = finished_sweep(layout, spec)
    if done is None:
        raise RuntimeError(
            f"no finished sweep for the current data and settings; materialize {spec.name}/hyperparameter_sweep first"
        )
    return spec.spec.with_overrides(done.best_params), done.mlflow_run_id


def train_adapter(
    layout: PipelineLayout,
    spec: LoadedSpec,
    tracker: Tracker,
    lineage: Lineage,
    launch: Launch,
    log: LogFn = print,
) -> AdapterOutcome:
    """Train the adapter for the current splits, base weights and settings, unless that exact one exists.
    A killed run leaves its checkpoints in the work folder; the next call with the same key resumes from them."""
    manifest, base = layout.read_manifest(), layout.read_base()
    tuned, sweep_run = tuned_spec(layout, spec)
    key = keys.adapter_key(manifest, base, tuned, keys.code_version(*CODE))
    exp = tracker.experiment_id
    out = layout.adapter(key)
    fingerprint = keys.training_fingerprint(manifest.drops, spec.spec_hash)
    if layout.adapter_record(key).exists():
        rec = AdapterRecord.load(layout.adapter_record(key))
        log(f"training data and settings unchanged: reusing adapter {key} trained in MLflow run {rec.train_run_id}")
        return AdapterOutcome(rec, TrainResult.load(out / RESULT_FILE), True, exp, fingerprint)
    work = layout.adapter_work(key)
    work.mkdir(parents=True, exist_ok=True)
    frames = layout.read_split_frames()
    with tracker.run("train", lineage, **{"finetune.sweep_run_id": sweep_run}) as run:
        log_splits(run, layout, spec, frames, manifest.digests, ["train", "validation"])
        run.log_params({**tuned.searchable_values(), **_logged_settings(tuned)})
        req = TrainRequest(
            base_path=base.path,
            model=tuned.model,
            training=tuned.training,
            runtime=tuned.runtime,
            train_messages=list(frames["train"]["messages"]),
            eval_messages=list(frames["validation"]["messages"]),
            output_dir=work,
            checkpoint_dir=layout.checkpoints(key),
            spec_dir=str(spec.base_dir),
            measure_cost=True,
            eos_max_new_tokens=tuned.evaluation.max_new_tokens,
        )
        req.save(layout.train_request(key))
        how = child_launch(
            tuned.runtime, tuned.training.num_processes, layout.train_request(key), layout.state.root, spec.base_dir
        )
        log(f"training child: {' '.join(how.command)} (request {layout.train_request(key)})")
        reported = launch(how)
        result = TrainResult.load(work / RESULT_FILE)
        rec = AdapterRecord(
            adapter_key=key,
            path=str(out),
            train_run_id=run.run_id,
            sweep_run_id=sweep_run,
            spec_hash=spec.spec_hash,
            code_version=keys.code_version(*CODE),
            base_weights_digest=base.digest,
            splits_version=manifest.version,
            split_digests=manifest.digests,
            drops=manifest.drops,
            params=tuned.searchable_values(),
            cost=reported,
            reproducibility=result.reproducibility,
        )
        _record_run(run, rec, result)
        outcome = AdapterOutcome(rec, result, False, exp, fingerprint)
        png = outcome.loss_png(spec.name)
        if png is not None:
            run.log_png(png, "loss_curve.png")
        rec.save(work / layout.adapter_record(key).name)
        for f in (layout.train_request(key), layout.train_request(key).with_name(PID_FILE)):
            f.unlink(missing_ok=True)
        shutil.rmtree(layout.checkpoints(key), ignore_errors=True)
        run.log_artifacts(work, artifact_path="adapter")
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return outcome


def _logged_settings(tuned: PipelineSpec) -> dict[str, Any]:
    m, t = tuned.model, tuned.training
    return {
        "method": m.method,
        "max_steps": t.max_steps,
        "base_model": m.base,
        "max_length": t.max_length,
        "dtype": m.dtype,
        "packing": t.packing,
        "padding_free": t.padding_free,
        "assistant_only_loss": t.assistant_only_loss,
    }


def _record_run(run: RunLog, rec: AdapterRecord, result: TrainResult) -> None:
    """Reproducibility tags, loss curves and the cost figures (as the child reported them) on the training run."""
    from finetune_pipeline.training.repro import flatten

    run.set_tags(flatten(rec.reproducibility_record()))
    run.log_series("train_loss", result.loss_history)
    run.log_series("eval_loss_curve", result.eval_history)
    numeric = {k: v for k, v in rec.cost.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    run.log_metrics(numeric)
