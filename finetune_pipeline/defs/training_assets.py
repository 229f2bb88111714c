"""Training-side assets: base_model, hyperparameter_sweep (optional), adapter.

Each is a thin shell: read inputs from the state root, call one library function, record MLflow lineage,
return metadata. torch & co. are imported only inside the library functions these call.
"""

import json
import shutil
from typing import Any

import dagster as dg

from finetune_pipeline.data.split import training_fingerprint
from finetune_pipeline.defs.common import CODE_VERSION, key, lineage, logger, mlflow_link, png_markdown
from finetune_pipeline.defs.inputs import content_key, log_splits, read_base, read_splits
from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.training.launch import child_command
from finetune_pipeline.training.repro import flatten as repro_flatten


def sweep_inputs_digest(manifest: dict[str, Any], base: dict[str, Any]) -> str:
    """What a sweep's trials depend on besides the settings: the splits, the base weights and the code."""
    return content_key(manifest["version"], base["digest"], CODE_VERSION)


def sweep_study(spec: LoadedSpec, manifest: dict[str, Any], base: dict[str, Any]) -> str:
    """The Optuna study for the current data, base weights, code and settings (the sweep and adapter agree on it)."""
    from finetune_pipeline.tuning.sweep import trial_training

    s = spec.spec
    settings = content_key(
        s.sweep.model_dump(mode="json"),
        s.model.model_dump(mode="json"),
        trial_training(s.training, s.sweep).model_dump(mode="json"),
    )
    return f"{spec.name}-{sweep_inputs_digest(manifest, base)}-{settings[:10]}"




def result_cost(result: dict[str, Any]) -> dict[str, Any]:
    """Cost metadata from a stored train_result.json."""
    keys = (
        "tokens_per_second",
        "train_tokens",
        "wall_seconds",
        "estimated_seconds",
        "peak_memory_mb",
        "trainable_params",
        "flops_per_token",
        "achieved_tflops",
        "matmul_peak_tflops",
        "flop_utilisation",
        "dtype",
        "device",
        "num_processes",
    )
    return {k: (round(result[k], 4) if isinstance(result.get(k), float) else result.get(k)) for k in keys}


def loss_figure(result: dict[str, Any], title: str) -> Any:
    """Train (and validation) loss against step, or None when nothing was logged."""
    hist, ev = result["loss_history"], result.get("eval_history", [])
    if not hist:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h[0] for h in hist], [h[1] for h in hist], marker="o", label="train")
    if ev:
        ax.plot([h[0] for h in ev], [h[1] for h in ev], marker="s", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} adapter")
    ax.legend()
    return fig


def build_training_assets(spec: LoadedSpec) -> list[dg.AssetsDefinition]:
    s = spec.spec
    k = {n: key(spec, n) for n in ("dataset_splits", "base_model", "hyperparameter_sweep", "adapter")}
    assets: list[dg.AssetsDefinition] = []

    @dg.asset(
        key=k["base_model"],
        group_name=spec.name,
        code_version=CODE_VERSION,
        kinds={"transformers"},
        description="Base model as a local safetensors folder (a packaged GGUF is converted once).",
    )
    def base_model(context: dg.AssetExecutionContext, state: StateStore) -> dg.MaterializeResult:
        from finetune_pipeline.models.base import PACKAGED, provision_base_model

        base = s.model.base
        if base not in PACKAGED and (base.startswith((".", "/", "~")) or spec.resolve(base).exists()):
            base = str(spec.resolve(base))  # a local folder, relative to the spec file
        pm = provision_base_model(base, s.model.trust_remote_code, target_root=state.models_dir())
        info = {"path": pm.path, "kind": pm.kind, "digest": pm.digest, "source": s.model.base}
        (state.pipeline_dir(spec.name) / "base_model.json").write_text(json.dumps(info, indent=2))
        context.log.info(
            f"base model {s.model.base} -> {pm.path} ({'converted' if pm.converted else 'reused'}, {pm.seconds:.1f}s)"
        )
        return dg.MaterializeResult(
            metadata={
                "path": dg.MetadataValue.path(pm.path),
                "kind": pm.kind,
                "weights_digest": pm.digest,
                "converted_now": pm.converted,
                "seconds": round(pm.seconds, 2),
            },
            data_version=dg.DataVersion(pm.digest),
        )

    assets.append(base_model)

    if s.sweep.enabled:

        @dg.asset(
            key=k["hyperparameter_sweep"],
            deps=[k["dataset_splits"], k["base_model"]],
            group_name=spec.name,
            code_version=CODE_VERSION,
            kinds={"optuna", "mlflow"},
            description="Optuna search over the spec's search space; the best parameters feed the adapter.",
        )
        def hyperparameter_sweep(
            context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking, optuna: OptunaStorage
        ) -> dg.MaterializeResult:
            from finetune_pipeline.tracking import mlflow_store
            from finetune_pipeline.tuning.sweep import run_sweep

            frames, manifest = read_splits(state, spec)
            base = read_base(state, spec)
            _, art = mlflow_tracking.setup_for(state)
            exp = mlflow_store.experiment_id(spec.name, art)
            lin = lineage(context, spec)
            best_file = state.pipeline_dir(spec.name) / "sweep" / "best.json"
            name = sweep_study(spec, manifest, base)
            done = json.loads(best_file.read_text()) if best_file.exists() else {}
            if done.get("study") == name:
                context.log.info(
                    f"sweep {name} already finished for this data (MLflow run {done['mlflow_run_id']}): reusing it"
                )
                return dg.MaterializeResult(
                    metadata={
                        "best_params": dg.MetadataValue.json(done["best_params"]),
                        "best_eval_loss": done["best_value"],
                        "trials_run_now": 0,
                        "study": name,
                        "reused": True,
                        **mlflow_link(mlflow_tracking.ui_url, exp, done["mlflow_run_id"]),
                    },
                    data_version=dg.DataVersion(content_key(name, done["best_params"])),
                )
            import mlflow

            def on_trial(t: Any) -> None:
                tags = {"optuna.study": name, "optuna.trial": str(t.number), "optuna.state": t.state}
                with mlflow_store.run(exp, f"trial-{t.number}", lin, nested=True, **tags):
                    mlflow.log_params(t.params)
                    for step, loss in t.loss_history:
                        mlflow.log_metric("train_loss", loss, step=step)
                    if t.eval_loss is not None:
                        mlflow.log_metrics({"eval_loss": t.eval_loss, "tokens_per_second": t.tokens_per_second})

            with mlflow_store.run(exp, "sweep", lin) as parent:
                log_splits(state, frames, manifest, spec, ["train", "validation"])
                res = run_sweep(
                    study_name=name,
                    base_path=base["path"],
                    spec=s,
                    train_messages=list(frames["train"]["messages"]),
                    val_messages=list(frames["validation"]["messages"]),
                    storage_uri=optuna.uri_for(state),
                    work_dir=state.pipeline_dir(spec.name) / "sweep",
                    log=logger(context),
                    on_trial=on_trial,
                )
                mlflow_store.log_metrics({"best_eval_loss": res.best_value})

                mlflow.log_params({f"best.{p}": v for p, v in res.best_params.items()})
                mlflow.set_tag("optuna.study", res.study_name)
            out = {
                "study": res.study_name,
                "best_params": res.best_params,
                "best_value": res.best_value,
                "mlflow_run_id": parent.info.run_id,
                "data_version": manifest["version"],
            }
            best_file.write_text(json.dumps(out, indent=2))
            return dg.MaterializeResult(
                metadata={
                    "best_params": dg.MetadataValue.json(res.best_params),
                    "best_eval_loss": res.best_value,
                    "trials_complete": res.n_complete,
                    "trials_pruned": res.n_pruned,
                    "trials_run_now": res.n_run_now,
                    "study": res.study_name,
                    "trials": dg.MetadataValue.json(res.trials),
                    "reused": False,
                    **mlflow_link(mlflow_tracking.ui_url, exp, parent.info.run_id),
                },
                data_version=dg.DataVersion(content_key(res.study_name, res.best_params)),
            )

        assets.append(hyperparameter_sweep)

    adapter_deps = [k["dataset_splits"], k["base_model"]] + ([k["hyperparameter_sweep"]] if s.sweep.enabled else [])

    @dg.asset(
        key=k["adapter"],
        deps=adapter_deps,
        group_name=spec.name,
        code_version=CODE_VERSION,
        kinds={"pytorch", "peft", "mlflow"},
        check_specs=[
            dg.AssetCheckSpec(
                "generations_end",
                asset=k["adapter"],
                description=f"At least {s.runtime.min_eos_rate:.0%} of sampled validation prompts get a tuned "
                "generation that ends with the EOS token (the trained chat template travels with the adapter).",
            )
        ],
        description="Fine-tuned adapter (LoRA/QLoRA) or full model, trained by trl's SFTTrainer in a child process (Dagster Pipes).",
    )
    def adapter(
        context: dg.AssetExecutionContext, state: StateStore, mlflow_tracking: MlflowTracking
    ) -> dg.MaterializeResult:
        from finetune_pipeline.tracking import mlflow_store
        from finetune_pipeline.training.sft import TrainRequest

        frames, manifest = read_splits(state, spec)
        base = read_base(state, spec)
        best = {}
        sweep_run = ""
        if s.sweep.enabled:
            best_file = state.pipeline_dir(spec.name) / "sweep" / "best.json"
            current = sweep_study(spec, manifest, base)
            sb = json.loads(best_file.read_text()) if best_file.exists() else {}
            if sb.get("study") != current:
                raise dg.Failure(
                    f"no finished sweep for the current data and settings (study {current}); "
                    f"materialize {spec.name}/hyperparameter_sweep first"
                )
            best, sweep_run = sb["best_params"], sb["mlflow_run_id"]
        tuned = s.with_overrides(best)
        params = tuned.searchable_values()
        adapter_key = content_key(
            manifest["version"],
            base["digest"],
            s.model.model_dump(mode="json"),
            s.training.model_dump(mode="json"),
            params,
            CODE_VERSION,
        )
        out = state.pipeline_dir(spec.name) / "adapters" / adapter_key
        fingerprint = training_fingerprint(manifest["drops"], spec.spec_hash)
        _, art = mlflow_tracking.setup_for(state)
        exp = mlflow_store.experiment_id(spec.name, art)
        if (out / "train_result.json").exists() and (out / "lineage.json").exists():
            lin_rec = json.loads((out / "lineage.json").read_text())
            context.log.info(
                f"training data and settings unchanged: reusing adapter {adapter_key} "
                f"trained in MLflow run {lin_rec['train_run_id']} (no retraining)"
            )
            reused = True
        else:
            reused = False
            # A killed run leaves its checkpoints here; the next materialization with the same key resumes from them.
            work = out.with_name(out.name + ".partial")
            work.mkdir(parents=True, exist_ok=True)
            record = {
                "spec_hash": spec.spec_hash,
                "code_version": CODE_VERSION,
                "base_weights_digest": base["digest"],
                "splits_version": manifest["version"],
                "data_digests": manifest["digests"],
                "adapter_key": adapter_key,
            }
            with mlflow_store.run(exp, "train", lineage(context, spec), **{"finetune.sweep_run_id": sweep_run}) as r:
                log_splits(state, frames, manifest, spec, ["train", "validation"])
                import mlflow

                mlflow.log_params(
                    {
                        **params,
                        "method": s.model.method,
                        "max_steps": s.training.max_steps,
                        "base_model": s.model.base,
                        "max_length": s.training.max_length,
                        "dtype": s.model.dtype,
                        "packing": s.training.packing,
                        "padding_free": s.training.padding_free,
                        "assistant_only_loss": s.training.assistant_only_loss,
                    }
                )
                req = TrainRequest(
                    base_path=base["path"],
                    model=tuned.model,
                    training=tuned.training,
                    runtime=s.runtime,
                    train_messages=list(frames["train"]["messages"]),
                    eval_messages=list(frames["validation"]["messages"]),
                    output_dir=work,
                    checkpoint_dir=work / "checkpoints",
                    spec_dir=str(spec.base_dir),
                    measure_cost=True,
                    eos_max_new_tokens=s.evaluation.max_new_tokens,
                )
                request_file = work / "request.json"
                req.save(request_file)
                cmd = child_command(s.runtime, s.training.num_processes)
                context.log.info(f"training child: {' '.join(cmd)} (request {request_file})")
                invocation = dg.PipesSubprocessClient(env={"PYTHONUNBUFFERED": "1"}).run(
                    command=cmd, context=context, extras={"request": str(request_file)}
                )
                invocation.get_materialize_result()  # the child reported its materialization: it finished
                result = json.loads((work / "train_result.json").read_text())
                record.update(result["reproducibility"])
                mlflow.set_tags(repro_flatten(record))
                for step, loss in result["loss_history"]:
                    mlflow.log_metric("train_loss", loss, step=step)
                for step, loss in result["eval_history"]:
                    mlflow.log_metric("eval_loss_curve", loss, step=step)
                mlflow_store.log_metrics(
                    {
                        "eval_loss": result["eval_loss"],
                        "tokens_per_second": result["tokens_per_second"],
                        "train_tokens": result["train_tokens"],
                        "wall_seconds": result["wall_seconds"],
                        "trainable_params": result["trainable_params"],
                        "peak_memory_mb": result["peak_memory_mb"],
                        "resumed_from_step": result["resumed_from_step"],
                        **{
                            m: result[m]
                            for m in ("estimated_seconds", "flop_utilisation", "achieved_tflops", "eos_rate")
                            if result.get(m) is not None
                        },
                    }
                )
                lin_rec = {
                    "train_run_id": r.info.run_id,
                    "sweep_run_id": sweep_run,
                    "splits_version": manifest["version"],
                    "split_digests": manifest["digests"],
                    "drops": manifest["drops"],
                    "fingerprint": fingerprint,
                    "dagster_run_id": context.run_id,
                }
                (work / "lineage.json").write_text(json.dumps(lin_rec, indent=2))
                (work / "reproducibility.json").write_text(json.dumps(record, indent=2))
                for f in ("request.json", "child.pid"):
                    (work / f).unlink(missing_ok=True)
                shutil.rmtree(work / "checkpoints", ignore_errors=True)
                fig = loss_figure(result, spec.name)
                if fig is not None:
                    mlflow.log_figure(fig, "loss_curve.png")
                mlflow.log_artifacts(str(work), artifact_path="adapter")
                shutil.rmtree(out, ignore_errors=True)
                work.rename(out)
        result = json.loads((out / "train_result.json").read_text())
        record = json.loads((out / "reproducibility.json").read_text())
        hist = result["loss_history"]
        meta: dict[str, Any] = {
            "path": dg.MetadataValue.path(str(out)),
            "adapter_key": adapter_key,
            "reused": reused,
            "method": result["method"],
            "steps": result["steps"],
            "resumed_from_step": result["resumed_from_step"],
            "stopped_early": result["stopped_early"],
            "eval_loss": result["eval_loss"],
            "first_loss": hist[0][1] if hist else None,
            "final_loss": hist[-1][1] if hist else None,
            **{k: v for k, v in result_cost(result).items() if v is not None},
            "lora_tensors_changed": f"{result['lora_tensors_changed']}/{result['lora_tensors_total']}",
            "params": dg.MetadataValue.json(params),
            "chat_template": result["chat_template_source"],
            "eos_token": result["eos_token"],
            "reproducibility": dg.MetadataValue.json(record),
            "training_fingerprint": fingerprint,
            **mlflow_link(mlflow_tracking.ui_url, exp, lin_rec["train_run_id"]),
        }
        fig = loss_figure(result, spec.name)
        if fig is not None:
            import matplotlib.pyplot as plt

            meta["loss_curve"] = png_markdown(fig, "loss curve")
            plt.close(fig)
        eos_rate = result.get("eos_rate")
        eos_ok = eos_rate is None or eos_rate >= s.runtime.min_eos_rate
        check = dg.AssetCheckResult(
            check_name="generations_end",
            passed=bool(eos_ok),
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "eos_rate": eos_rate if eos_rate is not None else "not checked (no validation rows or 0 samples)",
                "required": s.runtime.min_eos_rate,
                "eos_token": result["eos_token"],
                "samples": dg.MetadataValue.json(result.get("eos_samples", [])[:4]),
            },
            description=None
            if eos_ok
            else f"only {eos_rate:.0%} of sampled generations reach {result['eos_token']!r}: the model may not stop. "
            "Train longer, check training.chat_template, or lower runtime.min_eos_rate.",
        )
        return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(adapter_key), check_results=[check])

    assets.append(adapter)

    return assets
