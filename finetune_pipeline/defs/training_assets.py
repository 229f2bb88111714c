"""Training-side assets: base_model, hyperparameter_sweep (optional), adapter.

Each builder makes one asset: decorator, read inputs, one library call (finetune_pipeline.stages), the record
mapped to metadata and check results. torch & co. are imported only inside the library code these call.
"""

from typing import Any

import dagster as dg

from finetune_pipeline.defs.common import key, lineage, logger, mlflow_link, pipes_launch, png_markdown
from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.keys import code_version
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages import adapter as adapter_stage
from finetune_pipeline.stages.adapter import AdapterOutcome, train_adapter
from finetune_pipeline.stages.base_model import provision_base
from finetune_pipeline.stages.hyperparameter_sweep import sweep

TRAINING_POOL = "finetune_training"  # Dagster concurrency pool: its slots (dagster.yaml) bound concurrent training
BASE, SWEEP, ADAPTER = (
    "finetune_pipeline.stages.base_model",
    "finetune_pipeline.stages.hyperparameter_sweep",
    adapter_stage.CODE,
)


def base_model_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=key(spec, "base_model"), group_name=spec.name, code_version=code_version(BASE), kinds={"transformers"}
    )
    def base_model(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        """Base model as a local safetensors folder (a packaged GGUF is converted once)."""
        out = provision_base(state.pipeline(spec.name), spec)
        rec = out.record
        context.log.info(
            f"base model {rec.source} -> {rec.path} ({'converted' if out.converted_now else 'reused'}, {out.seconds:.1f}s)"
        )
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(rec.path),
                "kind": rec.kind,
                "weights_digest": rec.digest,
                "converted_now": out.converted_now,
                "seconds": round(out.seconds, 2),
            },
            data_version=dg.DataVersion(rec.digest),
        )

    return base_model


def sweep_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    @dg.asset(
        key=key(spec, "hyperparameter_sweep"),
        deps=[key(spec, "dataset_splits"), key(spec, "base_model"), key(spec, "data_readiness")],  # gates first
        group_name=spec.name,
        code_version=code_version(SWEEP),
        kinds={"optuna", "mlflow"},
        pool=TRAINING_POOL,
    )
    def hyperparameter_sweep(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking, optuna: OptunaStorage
    ) -> dg.MaterializeResult:
        """Optuna search over the spec's search space; the best parameters feed the adapter."""
        tracker = mlflow_tracking.tracker(state, spec.name)
        out = sweep(
            state.pipeline(spec.name),
            spec,
            optuna.uri_for(state),
            tracker,
            lineage(context, spec, SWEEP),
            launch=pipes_launch(context),
            log=logger(context),
        )
        rec = out.record
        return dg.MaterializeResult(
            metadata={
                "best_params": dg.MetadataValue.json(rec.best_params),
                f"best_{spec.sweep.objective}": rec.best_value,
                "trials_complete": rec.trials_complete,
                "trials_pruned": rec.trials_pruned,
                "trials_run_now": out.trials_run_now,
                "study": rec.study,
                "trials": dg.MetadataValue.json(rec.trials),
                "reused": out.reused,
                "trial_steps": out.trial_steps,
                **{name: png_markdown(png, name.replace("_", " ")) for name, png in out.plots.items()},
                **mlflow_link(tracker, rec.mlflow_run_id),
            },
            data_version=dg.DataVersion(out.data_version),
        )

    return hyperparameter_sweep


def adapter_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    s = spec.spec
    k = key(spec, "adapter")
    deps = [key(spec, "dataset_splits"), key(spec, "base_model"), key(spec, "data_readiness")]

    @dg.asset(
        key=k,
        deps=deps + ([key(spec, "hyperparameter_sweep")] if s.sweep.enabled else []),
        group_name=spec.name,
        code_version=code_version(*ADAPTER),
        kinds={"pytorch", "peft", "mlflow"},
        pool=TRAINING_POOL,
        check_specs=[
            dg.AssetCheckSpec(
                "generations_end",
                asset=k,
                description=f"At least {s.runtime.min_eos_rate:.0%} of sampled validation prompts get a tuned "
                "generation that ends with the EOS token (the trained chat template travels with the adapter).",
            )
        ],
    )
    def adapter(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        """Fine-tuned adapter (LoRA/QLoRA) or full model, trained by trl's SFTTrainer in a child process (Dagster Pipes)."""
        tracker = mlflow_tracking.tracker(state, spec.name)
        out = train_adapter(
            state.pipeline(spec.name),
            spec,
            tracker,
            lineage(context, spec, *ADAPTER),
            launch=pipes_launch(context),
            log=logger(context),
        )
        meta = adapter_metadata(out, spec)
        meta.update(mlflow_link(tracker, out.record.train_run_id))
        return dg.MaterializeResult(
            metadata=meta, data_version=dg.DataVersion(out.record.adapter_key), check_results=[eos_check(out, spec)]
        )

    return adapter


def adapter_metadata(out: AdapterOutcome, spec: LoadedSpec) -> dict[str, Any]:
    rec, res = out.record, out.result
    hist = res.loss_history
    meta: dict[str, Any] = {
        "path": dg.MetadataValue.path(rec.path),
        "adapter_key": rec.adapter_key,
        "reused": out.reused,
        "method": res.method,
        "steps": res.steps,
        "resumed_from_step": res.resumed_from_step,
        "stopped_early": res.stopped_early,
        "eval_loss": res.eval_loss,
        "first_loss": hist[0][1] if hist else None,
        "final_loss": hist[-1][1] if hist else None,
        **{k: v for k, v in rec.cost.items() if v is not None},  # as the training child reported it
        "lora_tensors_changed": f"{res.lora_tensors_changed}/{res.lora_tensors_total}",
        "params": dg.MetadataValue.json(rec.params),
        "chat_template": res.chat_template_source,
        "eos_token": res.eos_token,
        "reproducibility": dg.MetadataValue.json(rec.reproducibility_record()),
        "training_fingerprint": out.fingerprint,
    }
    png = out.loss_png(spec.name)
    if png is not None:
        meta["loss_curve"] = png_markdown(png, "loss curve")
    return meta


def eos_check(out: AdapterOutcome, spec: LoadedSpec) -> dg.AssetCheckResult:
    res, required = out.result, spec.runtime.min_eos_rate
    rate = res.eos_rate
    ok = rate is None or rate >= required
    return dg.AssetCheckResult(
        check_name="generations_end",
        passed=bool(ok),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "eos_rate": rate if rate is not None else "not checked (no validation rows or 0 samples)",
            "required": required,
            "eos_token": res.eos_token,
            "samples": dg.MetadataValue.json(res.eos_samples[:4]),
        },
        description=None
        if ok
        else f"only {rate:.0%} of sampled generations reach {res.eos_token!r}: the model may not stop. "
        "Train longer, check training.chat_template, or lower runtime.min_eos_rate.",
    )


def build_training_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    sweep_ = [sweep_asset(spec)] if spec.sweep.enabled else []
    return [base_model_asset(spec), *sweep_, adapter_asset(spec)]
