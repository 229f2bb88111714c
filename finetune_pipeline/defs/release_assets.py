"""Release-side assets: eval_report (with the tuned-beats-base gate) and registered_model (MLflow registry)."""

import json

import dagster as dg

from finetune_pipeline.defs.common import CODE_VERSION, key, lineage, logger, mlflow_link
from finetune_pipeline.defs.inputs import content_key, latest_version, log_splits, read_base, read_splits
from finetune_pipeline.defs.resources import MlflowTracking, StateStore
from finetune_pipeline.spec import LoadedSpec


def build_release_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    s = spec.spec
    k = {n: key(spec, n) for n in ("dataset_splits", "base_model", "adapter", "eval_report", "registered_model")}
    assets: list[dg.AssetsDefinition] = []

    gate = s.registry.min_improvement_over_base

    @dg.asset(
        key=k["eval_report"],
        deps=[k["adapter"], k["dataset_splits"], k["base_model"]],
        group_name=spec.name,
        code_version=CODE_VERSION,
        kinds={"mlflow"},
        check_specs=[
            dg.AssetCheckSpec(
                "tuned_beats_base",
                asset=k["eval_report"],
                blocking=True,
                description=f"Tuned beats base on the primary metric by at least {gate}.",
            )
        ],
        description="Base vs tuned on the test split: exact match, JSON validity, ROUGE-L, perplexity, samples side by side.",
    )
    def eval_report(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        from finetune_pipeline.evaluation.evaluate import evaluate
        from finetune_pipeline.evaluation.report import EvalReport, render_markdown
        from finetune_pipeline.tracking import mlflow_store

        frames, manifest = read_splits(state, spec)
        base = read_base(state, spec)
        adapter_key = latest_version(context, k["adapter"])
        adir = state.pipeline_dir(spec.name) / "adapters" / str(adapter_key)
        if not (adir / "lineage.json").exists():
            raise FileNotFoundError(f"adapter {adapter_key} not found at {adir}: materialize {spec.name}/adapter first")
        lin_rec = json.loads((adir / "lineage.json").read_text())
        eval_settings = s.evaluation.model_dump(mode="json")
        eval_key = content_key(adapter_key, manifest["digests"]["test"], eval_settings)
        edir = state.pipeline_dir(spec.name) / "eval" / eval_key
        _, art = mlflow_tracking.setup_for(state)
        exp = mlflow_store.experiment_id(spec.name, art)
        if (edir / "report.json").exists() and (edir / "eval_run_id").exists():
            report = EvalReport.from_json((edir / "report.json").read_text())
            run_id = (edir / "eval_run_id").read_text().strip()
            context.log.info(f"adapter and test data unchanged: reusing eval {eval_key} (MLflow run {run_id})")
        else:
            with mlflow_store.run(
                exp, "eval", lineage(context, spec), **{"finetune.train_run_id": lin_rec["train_run_id"]}
            ) as r:
                log_splits(state, frames, manifest, spec, ["test"])
                base_cache = (
                    state.pipeline_dir(spec.name)
                    / "eval"
                    / "base_outputs"
                    / (
                        content_key(
                            base["digest"],
                            manifest["digests"]["test"],
                            eval_settings,
                            s.model.dtype,
                            s.model.method,
                        )
                        + ".json"
                    )
                )
                report = evaluate(
                    base["path"],
                    s.model,
                    str(adir),
                    list(frames["test"]["messages"]),
                    s.evaluation,
                    base_cache=base_cache,
                    log=logger(context),
                )
                mlflow_store.log_metrics({f"base.{m}": v for m, v in report.base.items()})
                mlflow_store.log_metrics({f"tuned.{m}": v for m, v in report.tuned.items()})
                md = render_markdown(report, f"{spec.name}: base vs tuned")
                edir.mkdir(parents=True, exist_ok=True)
                (edir / "report.md").write_text(md)
                (edir / "report.json").write_text(report.to_json())
                import mlflow

                mlflow.log_artifact(str(edir / "report.md"))
                mlflow.log_artifact(str(edir / "report.json"))
                run_id = r.info.run_id
            (edir / "eval_run_id").write_text(run_id)
            (edir / "adapter_key").write_text(str(adapter_key))
        md = (edir / "report.md").read_text()
        gain = report.primary_improvement
        passed = gain == gain and gain >= gate
        return dg.MaterializeResult(
            metadata={
                "report": dg.MetadataValue.md(md),
                "primary_metric": report.primary_metric,
                "base": dg.MetadataValue.json(report.base),
                "tuned": dg.MetadataValue.json(report.tuned),
                "primary_improvement": gain,
                "n_samples": report.n_samples,
                "adapter_key": str(adapter_key),
                "path": dg.MetadataValue.path(str(edir)),
                **mlflow_link(mlflow_tracking.ui_url, exp, run_id),
            },
            data_version=dg.DataVersion(eval_key),
            check_results=[
                dg.AssetCheckResult(
                    check_name="tuned_beats_base",
                    passed=bool(passed),
                    metadata={
                        "metric": report.primary_metric,
                        "base": report.base[report.primary_metric],
                        "tuned": report.tuned[report.primary_metric],
                        "improvement": gain,
                        "required": gate,
                    },
                    description=None
                    if passed
                    else f"tuned {report.primary_metric} improves on base by {gain:.4f} < {gate}: "
                    "the model is not registered. Train longer, fix the data, or lower registry.min_improvement_over_base.",
                )
            ],
        )

    assets.append(eval_report)

    @dg.asset(
        key=k["registered_model"],
        deps=[k["eval_report"], k["adapter"], k["base_model"]],
        group_name=spec.name,
        code_version=CODE_VERSION,
        kinds={"mlflow"},
        check_specs=[
            dg.AssetCheckSpec(
                "reload_same_logits",
                asset=k["registered_model"],
                description="The registered model, reloaded from MLflow, gives the trained model's logits.",
            )
        ],
        description=f"MLflow model '{s.registry.model_name}': new versions get alias challenger; champion moves only if better.",
    )
    def registered_model(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        from finetune_pipeline.evaluation.report import EvalReport
        from finetune_pipeline.tracking import mlflow_store

        base = read_base(state, spec)
        eval_key = latest_version(context, k["eval_report"])
        edir = state.pipeline_dir(spec.name) / "eval" / eval_key
        report = EvalReport.from_json((edir / "report.json").read_text())
        gain = report.primary_improvement
        if not (gain == gain and gain >= gate):  # also when registered_model is materialized on its own
            raise dg.Failure(
                f"eval {eval_key} did not pass tuned_beats_base ({report.primary_metric} improvement {gain:.4f} "
                f"< {gate}): the model is not registered"
            )
        adapter_key = (edir / "adapter_key").read_text().strip()
        eval_run = (edir / "eval_run_id").read_text().strip()
        adir = state.pipeline_dir(spec.name) / "adapters" / adapter_key
        lin_rec = json.loads((adir / "lineage.json").read_text())
        _, art = mlflow_tracking.setup_for(state)
        exp = mlflow_store.experiment_id(spec.name, art)
        name = s.registry.model_name
        primary = report.primary_metric
        existing = mlflow_store.find_version_by_tag(name, "finetune.adapter_key", adapter_key)
        if existing is not None:
            version, register_run = str(existing.version), existing.tags.get("finetune.register_run_id", "")
            context.log.info(f"adapter {adapter_key} is already registered as {name} v{version}: not registering again")
        else:
            from finetune_pipeline.models.merge import standalone_model

            with mlflow_store.run(
                exp,
                "register",
                lineage(context, spec),
                **{"finetune.eval_run_id": eval_run, "finetune.train_run_id": lin_rec["train_run_id"]},
            ) as r:
                merged, tok = standalone_model(base["path"], s.model, str(adir))
                tags = {
                    "finetune.adapter_key": adapter_key,
                    "finetune.train_run_id": lin_rec["train_run_id"],
                    "finetune.sweep_run_id": lin_rec.get("sweep_run_id", ""),
                    "finetune.eval_run_id": eval_run,
                    "finetune.register_run_id": r.info.run_id,
                    "finetune.spec_hash": spec.spec_hash,
                    "finetune.splits_version": lin_rec["splits_version"],
                    **{f"finetune.dataset_digest.{sp}": d for sp, d in lin_rec["split_digests"].items()},
                    "finetune.drops": ",".join(lin_rec["drops"]),
                    "finetune.base_model": s.model.base,
                    "finetune.base_weights_digest": base["digest"],
                    "dagster.run_id": context.run_id,
                }
                context.log.info("logging the merged model to MLflow and registering it")
                _, version = mlflow_store.log_and_register(merged, tok, name, tags)
                register_run = r.info.run_id
                del merged
        # Verify the round trip before any alias moves; the result is kept on the version, so a re-run
        # (or a version registered by a run that crashed before this point) is verified exactly once.
        diff = mlflow_store.reload_diff(name, version)
        if diff is None:
            from finetune_pipeline.models.merge import tuned_model

            diff = mlflow_store.verify_reload(name, version, tuned_model(base["path"], s.model, str(adir)))
        context.log.info(
            f"{name} v{version} reloaded from the registry: max |logit difference| vs trained = {diff:.2e}"
        )
        tol = 1e-3
        if diff < tol:
            reg = mlflow_store.promote(name, version, primary, report.tuned[primary], s.registry.promotion_min_delta)
        else:
            reg = mlflow_store.Registration(
                name,
                version,
                f"models:/{name}/{version}",
                [],
                False,
                None,
                None,
                None,
                f"reload check failed ({diff:.2e} >= {tol}): no alias moved",
            )
            context.log.error(reg.reason)
        context.log.info(f"{name} v{version}: aliases {reg.aliases}; {reg.reason}")
        checks = [
            dg.AssetCheckResult(
                check_name="reload_same_logits",
                passed=diff < tol,
                metadata={"max_abs_logit_diff": diff, "tolerance": tol},
            )
        ]
        return dg.MaterializeResult(
            metadata={
                "model": name,
                "version": version,
                "model_uri": f"models:/{name}/{version}",
                "aliases": dg.MetadataValue.json(reg.aliases),
                "promoted": reg.promoted,
                "champion_version": reg.champion_version or "",
                "promotion_reason": reg.reason,
                f"tuned_{primary}": report.tuned[primary],
                "adapter_key": adapter_key,
                "serve": f"mlflow models serve -m models:/{name}@champion --env-manager local -h 127.0.0.1",
                **mlflow_link(mlflow_tracking.ui_url, exp, register_run or lin_rec["train_run_id"]),
            },
            data_version=dg.DataVersion(f"{name}-v{version}"),
            check_results=checks,
        )

    assets.append(registered_model)
    return assets
