"""Release-side assets: eval_report (with the tuned-beats-base gate) and registered_model (MLflow registry).

Each builder makes one asset: decorator, read inputs, one library call (finetune_pipeline.stages), the record
mapped to metadata and check results.
"""

import dagster as dg

from finetune_pipeline.defs.common import key, latest_version, lineage, logger, mlflow_link
from finetune_pipeline.defs.resources import MlflowTracking, StateStore
from finetune_pipeline.keys import code_version
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.evaluate import EvalOutcome, evaluate_adapter
from finetune_pipeline.stages.register import RELOAD_TOLERANCE, GateFailed, register
from finetune_pipeline.tracking.mlflow_store import experiment_for

EVALUATE, REGISTER = "finetune_pipeline.stages.evaluate", "finetune_pipeline.stages.register"


def eval_report_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "eval_report")
    gate = spec.spec.registry.min_improvement_over_base

    @dg.asset(
        key=k,
        deps=[key(spec, "adapter"), key(spec, "dataset_splits"), key(spec, "base_model")],
        group_name=spec.name,
        code_version=code_version(EVALUATE),
        kinds={"mlflow"},
        check_specs=[
            dg.AssetCheckSpec(
                "tuned_beats_base",
                asset=k,
                blocking=True,
                description=f"Tuned beats base on the primary metric by at least {gate} (registry.min_improvement_over_base).",
            )
        ],
    )
    def eval_report(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        """Base vs tuned on the test split: exact match, JSON validity, ROUGE-L, perplexity, samples side by side."""
        target = mlflow_tracking.target(state)
        out = evaluate_adapter(
            state.pipeline(spec.name),
            spec,
            latest_version(context, key(spec, "adapter")),
            target,
            lineage(context, spec, EVALUATE),
            log=logger(context),
        )
        r = out.record.report
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(out.markdown),
                "primary_metric": r.primary_metric,
                "base": dg.MetadataValue.json(r.base),
                "tuned": dg.MetadataValue.json(r.tuned),
                "primary_improvement": r.primary_improvement,
                "n_samples": r.n_samples,
                "adapter_key": out.record.adapter_key,
                "path": dg.MetadataValue.path(str(state.pipeline(spec.name).eval(out.record.eval_key))),
                **mlflow_link(target, out.experiment, out.record.run_id),
            },
            data_version=dg.DataVersion(out.record.eval_key),
            check_results=[gate_check(out, spec)],
        )

    return eval_report


def gate_check(out: EvalOutcome, spec: LoadedSpec) -> dg.AssetCheckResult:
    r, gate = out.record.report, spec.spec.registry.min_improvement_over_base
    passed = out.passes_gate(spec)
    return dg.AssetCheckResult(
        check_name="tuned_beats_base",
        passed=passed,
        metadata={
            "metric": r.primary_metric,
            "base": r.base[r.primary_metric],
            "tuned": r.tuned[r.primary_metric],
            "improvement": r.primary_improvement,
            "required": gate,
        },
        description=None
        if passed
        else f"tuned {r.primary_metric} improves on base by {r.primary_improvement:.4f} < {gate}: the model is not "
        "registered. Train longer, fix the data, or lower registry.min_improvement_over_base.",
    )


def registered_model_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "registered_model")
    name = spec.spec.registry.model_name

    @dg.asset(
        key=k,
        deps=[key(spec, "eval_report"), key(spec, "adapter"), key(spec, "base_model")],
        group_name=spec.name,
        code_version=code_version(REGISTER),
        kinds={"mlflow"},
        check_specs=[
            dg.AssetCheckSpec(
                "reload_same_logits",
                asset=k,
                description="The registered model, reloaded from MLflow, gives the trained model's logits.",
            )
        ],
        description=f"MLflow model '{name}': new versions get alias challenger; champion moves only if better.",
    )
    def registered_model(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        target = mlflow_tracking.target(state)
        try:
            reg = register(
                state.pipeline(spec.name),
                spec,
                latest_version(context, key(spec, "eval_report")),
                target,
                lineage(context, spec, REGISTER),
                log=logger(context),
            )
        except GateFailed as exc:
            raise dg.Failure(str(exc)) from exc
        reloaded_ok = reg.reload_max_logit_diff < RELOAD_TOLERANCE
        if not reloaded_ok:
            context.log.error(reg.reason)
        return dg.MaterializeResult(
            metadata={
                "model": reg.name,
                "version": reg.version,
                "model_uri": reg.model_uri,
                "aliases": dg.MetadataValue.json(reg.aliases),
                "promoted": reg.promoted,
                "champion_version": reg.champion_version or "",
                "promotion_reason": reg.reason,
                f"tuned_{reg.primary_metric}": reg.tuned_score,
                "adapter_key": reg.adapter_key,
                "serve": f"mlflow models serve -m models:/{reg.name}@champion --env-manager local -h 127.0.0.1",
                **mlflow_link(target, experiment_for(target, spec.name), reg.register_run_id),
            },
            data_version=dg.DataVersion(f"{reg.name}-v{reg.version}"),
            check_results=[
                dg.AssetCheckResult(
                    check_name="reload_same_logits",
                    passed=reloaded_ok,
                    metadata={"max_abs_logit_diff": reg.reload_max_logit_diff, "tolerance": RELOAD_TOLERANCE},
                )
            ],
        )

    return registered_model


def build_release_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    return [eval_report_asset(spec), registered_model_asset(spec)]
