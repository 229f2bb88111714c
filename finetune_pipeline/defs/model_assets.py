"""Model assets: base_model, hyperparameter_sweep, adapter, eval_report, registered_model.

Each is a thin shell: read inputs from the state root, call one library function, record MLflow lineage,
return metadata. torch & co. are imported only inside the library functions these call.
"""


import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from finetune_pipeline.data.split import SPLITS, training_fingerprint
from finetune_pipeline.defs.common import CODE_VERSION, key, lineage, logger, mlflow_link, png_markdown
from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.spec import LoadedSpec


def _h(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _splits(state: StateStore, spec: LoadedSpec) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    d = state.pipeline_dir(spec.name) / "splits"
    if not (d / "manifest.json").exists():
        raise FileNotFoundError(f"no dataset splits at {d}: materialize {spec.name}/dataset_splits first")
    return {s: pd.read_parquet(d / f"{s}.parquet") for s in SPLITS}, json.loads((d / "manifest.json").read_text())


def _base(state: StateStore, spec: LoadedSpec) -> dict[str, Any]:
    f = state.pipeline_dir(spec.name) / "base_model.json"
    if not f.exists():
        raise FileNotFoundError(f"materialize {spec.name}/base_model first")
    return json.loads(f.read_text())


def _log_splits(state: StateStore, frames: dict[str, pd.DataFrame], manifest: dict[str, Any], spec: LoadedSpec,
                which: list[str]) -> None:
    """log_input for each split read, with the split's digest (the same as in dataset_splits' metadata)."""
    from finetune_pipeline.tracking import mlflow_store

    folder = state.pipeline_dir(spec.name) / "splits"
    for s in which:
        mlflow_store.log_dataset(
            frames[s][["row_id", "drop", "source_line", "content_hash"]],
            name=f"{spec.name}/dataset_splits/{s}",
            digest=manifest["digests"][s],
            source=str(folder / f"{s}.parquet"),
            context={"train": "training", "validation": "validation", "test": "evaluation"}[s],
        )


def build_model_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    s = spec.spec
    k = {n: key(spec, n) for n in ("dataset_splits", "base_model", "hyperparameter_sweep", "adapter", "eval_report", "registered_model")}
    assets: list[dg.AssetsDefinition] = []

    @dg.asset(key=k["base_model"], group_name=spec.name, code_version=CODE_VERSION, kinds={"transformers"},
              description="Base model as a local safetensors folder (a packaged GGUF is converted once).")
    def base_model(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        from finetune_pipeline.models.base import provision_base_model

        base = s.model.base
        if Path(base).expanduser().exists() or base.startswith((".", "/")):
            base = str(spec.resolve(base))
        pm = provision_base_model(base, s.model.trust_remote_code, target_root=state.models_dir())
        info = {"path": pm.path, "kind": pm.kind, "digest": pm.digest, "source": s.model.base}
        (state.pipeline_dir(spec.name) / "base_model.json").write_text(json.dumps(info, indent=2))
        context.log.info(f"base model {s.model.base} -> {pm.path} ({'converted' if pm.converted else 'reused'}, {pm.seconds:.1f}s)")
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(pm.path), "kind": pm.kind, "weights_digest": pm.digest,
                      "converted_now": pm.converted, "seconds": round(pm.seconds, 2)},
            data_version=dg.DataVersion(pm.digest),
        )

    assets.append(base_model)

    if s.sweep.enabled:

        @dg.asset(key=k["hyperparameter_sweep"], deps=[k["dataset_splits"], k["base_model"]], group_name=spec.name,
                  code_version=CODE_VERSION, kinds={"optuna", "mlflow"},
                  description="Optuna search over the spec's search space; the best parameters feed the adapter.")
        def hyperparameter_sweep(context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking,
                                 optuna: OptunaStorage) -> dg.MaterializeResult:
            from finetune_pipeline.tracking import mlflow_store
            from finetune_pipeline.tuning.sweep import run_sweep, study_name

            frames, manifest = _splits(state, spec)
            base = _base(state, spec)
            _, art = mlflow_tracking.setup_for(state)
            exp = mlflow_store.experiment_id(spec.name, art)
            lin = lineage(context, spec)
            best_file = state.pipeline_dir(spec.name) / "sweep" / "best.json"
            name = study_name(spec.name, _h(manifest["version"], base["digest"]), s.sweep, s.model, s.training)
            done = json.loads(best_file.read_text()) if best_file.exists() else {}
            if done.get("study") == name:
                context.log.info(f"sweep {name} already finished for this data (MLflow run {done['mlflow_run_id']}): reusing it")
                return dg.MaterializeResult(
                    metadata={"best_params": dg.MetadataValue.json(done["best_params"]), "best_eval_loss": done["best_value"],
                              "trials_run_now": 0, "study": name, "reused": True,
                              **mlflow_link(mlflow_tracking.ui_url, exp, done["mlflow_run_id"])},
                    data_version=dg.DataVersion(_h(name, done["best_params"])),
                )
            with mlflow_store.run(exp, "sweep", lin) as parent:
                _log_splits(state, frames, manifest, spec, ["train", "validation"])
                res = run_sweep(
                    pipeline=spec.name, base_path=base["path"], model=s.model, training=s.training, sweep=s.sweep,
                    train_messages=list(frames["train"]["messages"]), val_messages=list(frames["validation"]["messages"]),
                    storage_uri=optuna.uri_for(state), data_digest=_h(manifest["version"], base["digest"]),
                    work_dir=state.pipeline_dir(spec.name) / "sweep", log=logger(context),
                    mlflow_experiment=exp, lineage=lin,
                )
                mlflow_store.log_metrics({"best_eval_loss": res.best_value})
                import mlflow

                mlflow.log_params({f"best.{p}": v for p, v in res.best_params.items()})
                mlflow.set_tag("optuna.study", res.study_name)
            out = {"study": res.study_name, "best_params": res.best_params, "best_value": res.best_value,
                   "mlflow_run_id": parent.info.run_id, "data_version": manifest["version"]}
            best_file.write_text(json.dumps(out, indent=2))
            return dg.MaterializeResult(
                metadata={"best_params": dg.MetadataValue.json(res.best_params), "best_eval_loss": res.best_value,
                          "trials_complete": res.n_complete, "trials_pruned": res.n_pruned, "trials_run_now": res.n_run_now,
                          "study": res.study_name, "trials": dg.MetadataValue.json(res.trials), "reused": False,
                          **mlflow_link(mlflow_tracking.ui_url, exp, parent.info.run_id)},
                data_version=dg.DataVersion(_h(res.study_name, res.best_params)),
            )

        assets.append(hyperparameter_sweep)

    adapter_deps = [k["dataset_splits"], k["base_model"]] + ([k["hyperparameter_sweep"]] if s.sweep.enabled else [])

    @dg.asset(key=k["adapter"], deps=adapter_deps, group_name=spec.name, code_version=CODE_VERSION,
              kinds={"pytorch", "peft", "mlflow"},
              description="Fine-tuned adapter (LoRA/QLoRA) or full model, trained with trl's SFTTrainer on the train split.")
    def adapter(context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
        from finetune_pipeline.tracking import mlflow_store
        from finetune_pipeline.training.sft import TrainRequest, effective_params, train

        frames, manifest = _splits(state, spec)
        base = _base(state, spec)
        best = {}
        sweep_run = ""
        if s.sweep.enabled:
            sb = json.loads((state.pipeline_dir(spec.name) / "sweep" / "best.json").read_text())
            best, sweep_run = sb["best_params"], sb["mlflow_run_id"]
        params = effective_params(s.training, s.model, best)
        adapter_key = _h(manifest["version"], base["digest"], s.model.model_dump(mode="json"),
                         s.training.model_dump(mode="json"), params, CODE_VERSION)
        out = state.pipeline_dir(spec.name) / "adapters" / adapter_key
        fingerprint = training_fingerprint(manifest["drops"], spec.spec_hash)
        _, art = mlflow_tracking.setup_for(state)
        exp = mlflow_store.experiment_id(spec.name, art)
        if (out / "train_result.json").exists() and (out / "lineage.json").exists():
            result = json.loads((out / "train_result.json").read_text())
            lin_rec = json.loads((out / "lineage.json").read_text())
            context.log.info(f"training data and settings unchanged: reusing adapter {adapter_key} "
                             f"trained in MLflow run {lin_rec['train_run_id']} (no retraining)")
            reused = True
        else:
            reused = False
            with mlflow_store.run(exp, "train", lineage(context, spec), **{"finetune.sweep_run_id": sweep_run}) as r:
                _log_splits(state, frames, manifest, spec, ["train", "validation"])
                import mlflow

                mlflow.log_params({**params, "method": s.model.method, "max_steps": s.training.max_steps,
                                   "base_model": s.model.base, "max_length": s.training.max_length})
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                res = train(
                    TrainRequest(base_path=base["path"], model=s.model, training=s.training,
                                 train_messages=list(frames["train"]["messages"]),
                                 eval_messages=list(frames["validation"]["messages"]), output_dir=tmp, overrides=best),
                    log=logger(context),
                )
                for step, loss in res.loss_history:
                    mlflow.log_metric("train_loss", loss, step=step)
                mlflow_store.log_metrics({"eval_loss": res.eval_loss, "tokens_per_second": res.tokens_per_second,
                                          "train_tokens": res.train_tokens, "wall_seconds": res.wall_seconds,
                                          "trainable_params": res.trainable_params})
                lin_rec = {"train_run_id": r.info.run_id, "sweep_run_id": sweep_run, "splits_version": manifest["version"],
                           "split_digests": manifest["digests"], "drops": manifest["drops"], "fingerprint": fingerprint,
                           "dagster_run_id": context.run_id}
                (tmp / "lineage.json").write_text(json.dumps(lin_rec, indent=2))
                mlflow.log_artifacts(str(tmp), artifact_path="adapter")
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
            result = json.loads((out / "train_result.json").read_text())
        hist = result["loss_history"]
        meta: dict[str, Any] = {
            "path": dg.MetadataValue.path(str(out)), "adapter_key": adapter_key, "reused": reused,
            "method": result["method"], "steps": result["steps"], "eval_loss": result["eval_loss"],
            "first_loss": hist[0][1] if hist else None, "final_loss": hist[-1][1] if hist else None,
            "tokens_per_second": round(result["tokens_per_second"], 1), "train_tokens": result["train_tokens"],
            "wall_seconds": round(result["wall_seconds"], 1), "trainable_params": result["trainable_params"],
            "lora_tensors_changed": f"{result['lora_tensors_changed']}/{result['lora_tensors_total']}",
            "params": dg.MetadataValue.json(result["params"]), "training_fingerprint": fingerprint,
            **mlflow_link(mlflow_tracking.ui_url, exp, lin_rec["train_run_id"]),
        }
        if hist:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot([h[0] for h in hist], [h[1] for h in hist], marker="o")
            ax.set_xlabel("step")
            ax.set_ylabel("train loss")
            ax.set_title(f"{spec.name} adapter")
            meta["loss_curve"] = png_markdown(fig, "loss curve")
            plt.close(fig)
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(adapter_key))

    assets.append(adapter)

    gate = s.evaluation.min_improvement_over_base

    @dg.asset(key=k["eval_report"], deps=[k["adapter"], k["dataset_splits"], k["base_model"]], group_name=spec.name,
              code_version=CODE_VERSION, kinds={"mlflow"},
              check_specs=[dg.AssetCheckSpec("tuned_beats_base", asset=k["eval_report"], blocking=True,
                                             description=f"Tuned beats base on the primary metric by at least {gate}.")],
              description="Base vs tuned on the test split: exact match, JSON validity, ROUGE-L, perplexity, samples side by side.")
    def eval_report(context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
        from finetune_pipeline.evaluation.evaluate import evaluate
        from finetune_pipeline.evaluation.report import EvalReport, render_markdown
        from finetune_pipeline.tracking import mlflow_store

        frames, manifest = _splits(state, spec)
        base = _base(state, spec)
        adapter_key = _latest_version(context, k["adapter"])
        adir = state.pipeline_dir(spec.name) / "adapters" / str(adapter_key)
        if not (adir / "lineage.json").exists():
            raise FileNotFoundError(f"adapter {adapter_key} not found at {adir}: materialize {spec.name}/adapter first")
        lin_rec = json.loads((adir / "lineage.json").read_text())
        eval_key = _h(adapter_key, manifest["digests"]["test"], s.evaluation.model_dump(mode="json"))
        edir = state.pipeline_dir(spec.name) / "eval" / eval_key
        _, art = mlflow_tracking.setup_for(state)
        exp = mlflow_store.experiment_id(spec.name, art)
        if (edir / "report.json").exists() and (edir / "eval_run_id").exists():
            report = EvalReport.from_json((edir / "report.json").read_text())
            run_id = (edir / "eval_run_id").read_text().strip()
            context.log.info(f"adapter and test data unchanged: reusing eval {eval_key} (MLflow run {run_id})")
        else:
            with mlflow_store.run(exp, "eval", lineage(context, spec), **{"finetune.train_run_id": lin_rec["train_run_id"]}) as r:
                _log_splits(state, frames, manifest, spec, ["test"])
                base_cache = state.pipeline_dir(spec.name) / "eval" / "base_outputs" / (
                    _h(base["digest"], manifest["digests"]["test"], s.evaluation.model_dump(mode="json"), s.model.dtype, s.model.method) + ".json")
                report = evaluate(base["path"], s.model, str(adir), list(frames["test"]["messages"]), s.evaluation,
                                  base_cache=base_cache, log=logger(context))
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
        md = render_markdown(report, f"{spec.name}: base vs tuned")
        gain = report.primary_improvement
        passed = gain == gain and gain >= gate
        return dg.MaterializeResult(
            metadata={"report": dg.MetadataValue.md(md), "primary_metric": report.primary_metric,
                      "base": dg.MetadataValue.json(report.base), "tuned": dg.MetadataValue.json(report.tuned),
                      "primary_improvement": gain, "n_samples": report.n_samples, "adapter_key": str(adapter_key),
                      "path": dg.MetadataValue.path(str(edir)), **mlflow_link(mlflow_tracking.ui_url, exp, run_id)},
            data_version=dg.DataVersion(eval_key),
            check_results=[dg.AssetCheckResult(
                check_name="tuned_beats_base", passed=bool(passed),
                metadata={"metric": report.primary_metric, "base": report.base[report.primary_metric],
                          "tuned": report.tuned[report.primary_metric], "improvement": gain, "required": gate},
                description=None if passed else f"tuned {report.primary_metric} improves on base by {gain:.4f} < {gate}: "
                "the model is not registered. Train longer, fix the data, or lower evaluation.min_improvement_over_base.")],
        )

    assets.append(eval_report)

    @dg.asset(key=k["registered_model"], deps=[k["eval_report"], k["adapter"], k["base_model"]], group_name=spec.name,
              code_version=CODE_VERSION, kinds={"mlflow"},
              check_specs=[dg.AssetCheckSpec("reload_same_logits", asset=k["registered_model"],
                                             description="The registered model, reloaded from MLflow, gives the trained model's logits.")],
              description=f"MLflow model '{s.registry.model_name}': new versions get alias challenger; champion moves only if better.")
    def registered_model(context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
        from finetune_pipeline.tracking import mlflow_store

        base = _base(state, spec)
        eval_key = _latest_version(context, k["eval_report"])
        edir = state.pipeline_dir(spec.name) / "eval" / eval_key
        from finetune_pipeline.evaluation.report import EvalReport

        report = EvalReport.from_json((edir / "report.json").read_text())
        adapter_key = (edir / "adapter_key").read_text().strip()
        eval_run = (edir / "eval_run_id").read_text().strip()
        adir = state.pipeline_dir(spec.name) / "adapters" / adapter_key
        lin_rec = json.loads((adir / "lineage.json").read_text())
        _, art = mlflow_tracking.setup_for(state)
        exp = mlflow_store.experiment_id(spec.name, art)
        name = s.registry.model_name
        primary = report.primary_metric
        existing = mlflow_store.find_version_by_tag(name, "finetune.adapter_key", adapter_key)
        diff = None
        if existing is not None:
            version, register_run = str(existing.version), existing.tags.get("finetune.register_run_id", "")
            context.log.info(f"adapter {adapter_key} is already registered as {name} v{version}: not registering again")
        else:
            from finetune_pipeline.models.merge import max_logit_diff, standalone_model, tuned_model

            with mlflow_store.run(exp, "register", lineage(context, spec), **{"finetune.eval_run_id": eval_run,
                                                                               "finetune.train_run_id": lin_rec["train_run_id"]}) as r:
                merged, tok = standalone_model(base["path"], s.model, str(adir))
                tags = {
                    "finetune.adapter_key": adapter_key, "finetune.train_run_id": lin_rec["train_run_id"],
                    "finetune.sweep_run_id": lin_rec.get("sweep_run_id", ""), "finetune.eval_run_id": eval_run,
                    "finetune.register_run_id": r.info.run_id, "finetune.spec_hash": spec.spec_hash,
                    "finetune.splits_version": lin_rec["splits_version"],
                    **{f"finetune.dataset_digest.{sp}": d for sp, d in lin_rec["split_digests"].items()},
                    "finetune.drops": ",".join(lin_rec["drops"]), "finetune.base_model": s.model.base,
                    "finetune.base_weights_digest": base["digest"], "dagster.run_id": context.run_id,
                }
                context.log.info("logging the merged model to MLflow and registering it")
                uri, version = mlflow_store.log_and_register(merged, tok, name, tags)
                register_run = r.info.run_id
                import mlflow.transformers

                reloaded = mlflow.transformers.load_model(uri, return_type="components")["model"]
                trained = tuned_model(base["path"], s.model, str(adir))
                diff = max_logit_diff(trained, reloaded, tok)
                mlflow_store.log_metrics({"reload_max_logit_diff": diff})
                context.log.info(f"reloaded {uri}: max |logit difference| vs trained adapter = {diff:.2e}")
                del merged, reloaded, trained
        reg = mlflow_store.promote(name, version, primary, report.tuned[primary], s.registry.promotion_min_delta)
        context.log.info(f"{name} v{version}: aliases {reg.aliases}; {reg.reason}")
        tol = 1e-3
        checks = [dg.AssetCheckResult(check_name="reload_same_logits", passed=diff is None or diff < tol,
                                      metadata={"max_abs_logit_diff": diff if diff is not None else -1.0, "tolerance": tol},
                                      description="checked when the version was registered" if diff is None else None)]
        return dg.MaterializeResult(
            metadata={"model": name, "version": version, "model_uri": f"models:/{name}/{version}",
                      "aliases": dg.MetadataValue.json(reg.aliases), "promoted": reg.promoted,
                      "champion_version": reg.champion_version or "", "promotion_reason": reg.reason,
                      f"tuned_{primary}": report.tuned[primary], "adapter_key": adapter_key,
                      "serve": f"mlflow models serve -m models:/{name}@champion --env-manager local -h 127.0.0.1",
                      **mlflow_link(mlflow_tracking.ui_url, exp, register_run or lin_rec["train_run_id"])},
            data_version=dg.DataVersion(f"{name}-v{version}"),
            check_results=checks,
        )

    assets.append(registered_model)
    return assets


def _latest_version(context: dg.AssetExecutionContext, asset_key: dg.AssetKey) -> str:
    """Data version of the latest materialization of an upstream asset (it names the folder to read)."""
    ev = context.instance.get_latest_materialization_event(asset_key)
    mat = ev.asset_materialization if ev is not None else None
    if mat is None:
        raise FileNotFoundError(f"{asset_key.to_user_string()} has not been materialized yet")
    version = (mat.tags or {}).get("dagster/data_version")
    if not version:
        raise ValueError(f"{asset_key.to_user_string()} has no data version")
    return version
