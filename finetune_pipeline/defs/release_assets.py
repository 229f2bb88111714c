"""Release-side assets: eval_report (with the tuned-beats-base gate) and registered_model (MLflow registry).

Each builder makes one asset: decorator, read inputs, one library call (finetune_pipeline.stages), the record
mapped to metadata and check results.
"""

from base64 import b64encode

import dagster as dg
import pandas as pd

from finetune_pipeline.defs.common import key, latest_version, lineage, logger, mlflow_link, table
from finetune_pipeline.defs.resources import MlflowTracking, StateStore
from finetune_pipeline.keys import code_version
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.eval_report import EvalOutcome, evaluate_adapter
from finetune_pipeline.stages.register import RELOAD_TOLERANCE, GateFailed, register

EVALUATE, REGISTER = "finetune_pipeline.stages.eval_report", "finetune_pipeline.stages.register"
RELEASE = "finetune_pipeline.stages.release"


def eval_report_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "eval_report")
    gate = spec.registry.min_improvement_over_base

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
                description=f"The lower bound of tuned - base on the primary metric (paired bootstrap, same rows) "
                f"is at least {gate} (registry.min_improvement_over_base).",
            ),
            dg.AssetCheckSpec(
                "no_forgetting",
                asset=k,
                description="Perplexity on general text does not grow past evaluation.forgetting.max_perplexity_ratio "
                "(a warning).",
            ),
        ],
    )
    def eval_report(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        """Base, tuned and the current champion on the same test rows, with paired bootstrap intervals."""
        tracker = mlflow_tracking.tracker(state, spec.name)
        out = evaluate_adapter(
            state.pipeline(spec.name),
            spec,
            latest_version(context, key(spec, "adapter")),
            tracker,
            lineage(context, spec, EVALUATE),
            log=logger(context),
        )
        return dg.MaterializeResult(
            metadata={
                **eval_metadata(out),
                "path": dg.MetadataValue.path(str(state.pipeline(spec.name).eval(out.record.eval_key))),
                **mlflow_link(tracker, out.record.run_id),
            },
            data_version=dg.DataVersion(out.record.eval_key),
            check_results=[gate_check(out, spec), forgetting_check(out)],
        )

    return eval_report


def _intervals(ivs: dict) -> dict[str, dict[str, float | int | None]]:
    return {
        m: {"delta": iv.delta, "low": iv.low, "high": iv.high, "rows_needed": iv.rows_needed} for m, iv in ivs.items()
    }


def eval_metadata(out: EvalOutcome) -> dict:
    """The evaluation record as Dagster metadata: the table, every interval, the plot."""
    r = out.record.report
    iv = r.primary_interval()
    meta = {
        "report": dg.MetadataValue.md(out.markdown),
        "primary_metric": r.primary_metric,
        "base": dg.MetadataValue.json(r.base),
        "tuned": dg.MetadataValue.json(r.tuned),
        "champion": dg.MetadataValue.json(r.champion or {}),
        "champion_version": r.champion_version or "",
        "tuned_vs_base": dg.MetadataValue.json(_intervals(r.vs_base)),
        "tuned_vs_champion": dg.MetadataValue.json(_intervals(r.vs_champion)),
        "primary_improvement": r.primary_improvement,
        "primary_improvement_low": iv.low if iv else r.primary_improvement,
        "n_samples": r.n_samples,
        "test_digest": out.record.test_digest,
        "adapter_key": out.record.adapter_key,
    }
    if out.plot:
        meta["intervals_plot"] = dg.MetadataValue.md(
            f"![intervals](data:image/png;base64,{b64encode(out.plot).decode()})"
        )
    return meta


def gate_check(out: EvalOutcome, spec: LoadedSpec) -> dg.AssetCheckResult:
    r, gate = out.record.report, spec.registry.min_improvement_over_base
    passed, iv = out.passes_gate(spec), r.primary_interval()
    return dg.AssetCheckResult(
        check_name="tuned_beats_base",
        passed=passed,
        metadata={
            "metric": r.primary_metric,
            "base": r.base[r.primary_metric],
            "tuned": r.tuned[r.primary_metric],
            "improvement": r.primary_improvement,
            "lower_bound": iv.low if iv else r.primary_improvement,
            "upper_bound": iv.high if iv else r.primary_improvement,
            "n": r.n_samples,
            "rows_needed": (iv.rows_needed if iv else None) or 0,
            "required": gate,
        },
        description=None
        if passed
        else f"tuned - base on {r.primary_metric}: {iv.describe() if iv else r.primary_improvement}; the lower bound "
        f"must be >= {gate}: the model is not registered. Train longer, fix the data, add test rows, or lower "
        "registry.min_improvement_over_base.",
    )


def forgetting_check(out: EvalOutcome) -> dg.AssetCheckResult:
    f = out.record.report.forgetting
    if f is None:
        return dg.AssetCheckResult(check_name="no_forgetting", passed=True, description="probe disabled")
    return dg.AssetCheckResult(
        check_name="no_forgetting",
        passed=not f.warn,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "probe": f.probe,
            "base_perplexity": f.base_perplexity,
            "tuned_perplexity": f.tuned_perplexity,
            "ratio": f.ratio,
            "max_ratio": f.max_ratio,
        },
    )


def registered_model_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "registered_model")
    name = spec.registry.model_name

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
        tracker = mlflow_tracking.tracker(state, spec.name)
        try:
            reg = register(
                state.pipeline(spec.name),
                spec,
                latest_version(context, key(spec, "eval_report")),
                tracker,
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
                "evidence": dg.MetadataValue.json(reg.evidence),
                "model_card": dg.MetadataValue.md(reg.model_card or "(no card: the reload check failed)"),
                "adapter_key": reg.adapter_key,
                "serve": f"mlflow models serve -m models:/{reg.name}@champion --env-manager local -h 127.0.0.1",
                **mlflow_link(tracker, reg.register_run_id),
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


def release_asset(spec: LoadedSpec) -> dg.AssetsDefinition:
    k = key(spec, "release")
    r = spec.spec.release

    @dg.asset(
        key=k,
        deps=[key(spec, "registered_model")],
        group_name=spec.name,
        code_version=code_version(RELEASE),
        kinds={"mlflow", "gguf", "safetensors"},
        check_specs=[
            dg.AssetCheckSpec(
                "artifacts_match_evaluated",
                asset=k,
                blocking=True,
                description=f"Every exported artifact, scored on the evaluated test rows, keeps the lower bound of "
                f"artifact - evaluated model on the primary metric at or above -{r.max_drop} (release.max_drop).",
            )
        ],
        description=f"The champion of '{spec.registry.model_name}' exported as {', '.join(r.formats)}; each "
        "artifact scored on the evaluation's test rows and load-tested on loopback.",
    )
    def release(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        from finetune_pipeline.stages.release import build_release, metadata_rows

        rec, reused = build_release(
            state.pipeline(spec.name), spec, mlflow_tracking.tracker(state, spec.name), log=logger(context)
        )
        failures = rec.failures()
        pm = rec.primary_metric
        return dg.MaterializeResult(
            metadata={
                "model": rec.name,
                "version": rec.version,
                "reused": reused,
                "artifacts": table(pd.DataFrame(metadata_rows(rec))),
                "model_card_section": dg.MetadataValue.md(rec.card),
                f"evaluated_{pm}": rec.evaluated.get(pm),
                "merge_max_logit_diff": rec.export.merge_max_logit_diff
                if rec.export.merge_max_logit_diff is not None
                else "n/a (full fine-tuning)",
                "loaders": dg.MetadataValue.json({s.format: s.loader for s in rec.scores}),
                "serving": dg.MetadataValue.json([s.model_dump(mode="json") for s in rec.serving]),
                "modelfile": dg.MetadataValue.md(
                    f"```\n{rec.export.modelfile}```" if rec.export.modelfile else "(no GGUF)"
                ),
                "vllm_serve": dg.MetadataValue.md(
                    "\n".join(f"    {c}" for c in rec.vllm_commands) or "(vllm not in release.targets)"
                ),
                "path": dg.MetadataValue.path(str(state.pipeline(spec.name).release(rec.version, rec.release_key))),
            },
            data_version=dg.DataVersion(rec.release_key),
            check_results=[
                dg.AssetCheckResult(
                    check_name="artifacts_match_evaluated",
                    passed=not failures,
                    metadata={"max_drop": rec.max_drop, "metric": pm, "failures": dg.MetadataValue.json(failures)},
                    description=None
                    if not failures
                    else f"artifact(s) scoring below the evaluated model by more than {rec.max_drop} on {pm} at the "
                    f"lower bound: {'; '.join(failures)}. Do not ship them: drop the format from release.formats, or "
                    "raise release.max_drop if that loss is acceptable.",
                )
            ],
        )

    return release


def build_release_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    out = [eval_report_asset(spec), registered_model_asset(spec)]
    return out + ([release_asset(spec)] if spec.spec.release.enabled else [])
