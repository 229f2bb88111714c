"""registered_model: log the merged chat model to the MLflow registry, verify the round trip, then decide on the
paired evidence of the evaluation and move aliases."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_pipeline.evaluation.report import EvalRecord, with_intervals
from finetune_pipeline.layout import AdapterRecord, PipelineLayout, Registration
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.evaluate import margins
from finetune_pipeline.tracking import mlflow_store
from finetune_pipeline.tracking.mlflow_store import Lineage, TrackingTarget

LogFn = Callable[[str], None]
RELOAD_TOLERANCE = 1e-3
# MLflow models-from-code: loaded by MLflow from the model folder, never imported by the package
_SERVING_CODE = Path(__file__).resolve().parent.parent / "models" / "served_model.py"


class GateFailed(RuntimeError):
    """The evaluation did not pass the registration gate: nothing is registered."""


def load_evidence(layout: PipelineLayout, spec: LoadedSpec, eval_key: str) -> EvalRecord:
    """The evaluation record with its intervals recomputed at the current registry confidence and margins."""
    s = spec.spec
    ev = EvalRecord.load(layout.eval_record(eval_key))
    m_base, m_champ = margins(spec)
    report = with_intervals(ev.report, ev.scores, s.evaluation, s.registry.confidence, m_base, m_champ)
    return ev.model_copy(update={"report": report})


def register(
    layout: PipelineLayout,
    spec: LoadedSpec,
    eval_key: str,
    tracking: TrackingTarget,
    lineage: Lineage,
    log: LogFn = print,
) -> Registration:
    """Register the evaluated adapter (once per adapter), check that the registry copy gives the trained
    logits, and only then give it ``challenger`` and, if the paired evidence says it beats the champion,
    ``champion``. A failed reload leaves the version with neither alias."""
    s = spec.spec
    ev = load_evidence(layout, spec, eval_key)
    report, gate = ev.report, s.registry.min_improvement_over_base
    if not report.passes_gate(gate):  # also when registered_model is materialized on its own
        iv = report.primary_interval()
        shown = iv.describe() if iv else f"{report.primary_improvement:.4f}"
        raise GateFailed(
            f"eval {eval_key} did not pass tuned_beats_base ({report.primary_metric} tuned - base {shown}; "
            f"the lower bound must be >= {gate}): the model is not registered"
        )
    adapter = AdapterRecord.load(layout.adapter_record(ev.adapter_key))
    name, version, register_run = _register_once(layout, spec, ev, adapter, tracking, lineage, log)
    diff = _reload_diff(layout, spec, adapter, name, version)
    log(f"{name} v{version} reloaded from the registry: max |logit difference| vs trained = {diff:.2e}")
    primary, score = report.primary_metric, report.tuned[report.primary_metric]
    reg = Registration(
        name=name,
        version=version,
        model_uri=f"models:/{name}/{version}",
        aliases=[],
        promoted=False,
        champion_version=None,
        previous_champion=None,
        previous_champion_score=None,
        reason=f"reload check failed ({diff:.2e} >= {RELOAD_TOLERANCE}): no alias moved",
        reload_max_logit_diff=diff,
        adapter_key=adapter.adapter_key,
        register_run_id=register_run,
        tuned_score=score,
        primary_metric=primary,
    )
    if diff < RELOAD_TOLERANCE:
        reg = _promote(reg, spec, ev, adapter)
    else:
        mlflow_store.clear_aliases(name, version)
    reg.save(layout.registration)
    log(f"{name} v{version}: aliases {reg.aliases}; {reg.reason}")
    return reg


def _register_once(
    layout: PipelineLayout,
    spec: LoadedSpec,
    ev: EvalRecord,
    adapter: AdapterRecord,
    tracking: TrackingTarget,
    lineage: Lineage,
    log: LogFn,
) -> tuple[str, str, str]:
    """(name, version, register run id): an adapter already registered is not registered again."""
    name = spec.spec.registry.model_name
    existing = mlflow_store.find_version_by_tag(name, "finetune.adapter_key", adapter.adapter_key)
    if existing is not None:
        log(f"adapter {adapter.adapter_key} is already registered as {name} v{existing.version}")
        return name, str(existing.version), existing.tags.get("finetune.register_run_id", "")
    from finetune_pipeline.models import chat_generation
    from finetune_pipeline.models.merge import standalone_model

    exp = mlflow_store.experiment_for(tracking, spec.name)
    links = {"finetune.eval_run_id": ev.run_id, "finetune.train_run_id": adapter.train_run_id}
    with mlflow_store.run(exp, "register", lineage, **links) as run:
        merged, tok = standalone_model(layout.read_base().path, spec.spec.model, adapter.path)
        tags = {
            "finetune.adapter_key": adapter.adapter_key,
            "finetune.train_run_id": adapter.train_run_id,
            "finetune.sweep_run_id": adapter.sweep_run_id,
            "finetune.eval_run_id": ev.run_id,
            "finetune.register_run_id": run.info.run_id,
            "finetune.spec_hash": spec.spec_hash,
            "finetune.splits_version": adapter.splits_version,
            **{f"finetune.dataset_digest.{sp}": d for sp, d in adapter.split_digests.items()},
            "finetune.drops": ",".join(adapter.drops),
            "finetune.base_model": spec.spec.model.base,
            "finetune.base_weights_digest": adapter.base_weights_digest,
            "dagster.run_id": lineage.dagster_run_id,
        }
        e = spec.spec.evaluation
        defaults = {
            "max_new_tokens": e.max_new_tokens,
            "temperature": 0.0,
            "batch_size": e.batch_size,
            "model_name": name,
        }
        log("logging the merged chat model (weights, tokenizer with chat template, generation defaults) to MLflow")
        _, version = mlflow_store.log_and_register(
            merged, tok, name, tags, _SERVING_CODE, [Path(chat_generation.__file__)], defaults
        )
        return name, version, run.info.run_id


def _reload_diff(layout: PipelineLayout, spec: LoadedSpec, adapter: AdapterRecord, name: str, version: str) -> float:
    """Largest logit difference between the registry copy and the trained model, measured once per version."""
    diff = mlflow_store.reload_diff(name, version)
    if diff is not None:
        return diff
    from finetune_pipeline.models.merge import max_logit_diff, tuned_model

    model, tok = mlflow_store.load_registered(name, version)
    diff = max_logit_diff(tuned_model(layout.read_base().path, spec.spec.model, adapter.path), model, tok)
    mlflow_store.record_reload_diff(name, version, diff)
    return diff


def _facts(spec: LoadedSpec, adapter: AdapterRecord) -> dict[str, str]:
    s = spec.spec
    t, lora = s.training, s.model.lora
    return {
        "base model": f"{s.model.base} (weights digest {adapter.base_weights_digest})",
        "method": f"{s.model.method}" + (f", LoRA r={lora.r} alpha={lora.alpha}" if s.model.method != "full" else ""),
        "training": f"{trained_steps(t, adapter.cost)}, learning_rate={t.learning_rate}, batch={t.per_device_train_batch_size}, max_length={t.max_length}, seed={t.seed}",
        "data digests": ", ".join(f"{k}={v}" for k, v in adapter.split_digests.items()),
        "drops": ", ".join(adapter.drops),
        "adapter key": adapter.adapter_key,
    }


def trained_steps(t: Any, cost: dict[str, Any]) -> str:
    """The steps the adapter actually trained (as its training child reported them), what was planned (from
    max_steps or num_train_epochs) and what cut them (a time budget, early stopping)."""
    planned = cost.get("planned_steps") or t.max_steps
    steps = cost.get("steps", planned)
    how = f"max_steps={t.max_steps}" if t.max_steps is not None else f"num_train_epochs={t.num_train_epochs:g}"
    out = f"steps trained={steps} (planned {planned} from {how}"
    if cost.get("budget_steps") is not None and cost["budget_steps"] < (planned or 0):
        out += f"; training.max_minutes={t.max_minutes:g} allowed {cost['budget_steps']}"
    if cost.get("stopped_early"):
        out += "; stopped early on the validation loss"
    out += ")"
    if cost.get("epochs_trained") is not None:
        out += f", epochs trained={cost['epochs_trained']:.2f}"
    return out


def _promote(reg: Registration, spec: LoadedSpec, ev: EvalRecord, adapter: AdapterRecord) -> Registration:
    """Decide on the paired evidence (same rows as the current champion), store the evidence and the model card
    on the version, then move the aliases."""
    from finetune_pipeline.evaluation.card import evidence_tags, model_card
    from finetune_pipeline.evaluation.promotion import decide

    s = spec.spec
    champ = mlflow_store.champion(reg.name)
    d = decide(
        reg.version, ev.report, champ.version if champ else None, s.registry.promotion_min_delta, s.registry.floors
    )
    tags = evidence_tags(ev, d, s.evaluation.bootstrap_seed, s.evaluation.bootstrap_resamples)
    card = model_card(reg.name, reg.version, ev, d, _facts(spec, adapter), spec.spec.description)
    mlflow_store.record_evidence(reg.name, reg.version, tags, card)
    mlflow_store.set_challenger(reg.name, reg.version)
    if d.promote and (champ is None or champ.version != reg.version):
        mlflow_store.move_champion(reg.name, reg.version, d.reason, datetime.now(UTC).isoformat(timespec="seconds"))
    champion_score = (ev.report.champion or {}).get(reg.primary_metric)
    return reg.model_copy(
        update={
            "aliases": ["challenger"] + (["champion"] if d.promote else []),
            "promoted": d.promote,
            "champion_version": reg.version if d.promote else (champ.version if champ else None),
            "previous_champion": champ.version if champ else None,
            "previous_champion_score": champion_score,
            "reason": d.reason,
            "evidence": tags,
            "model_card": card,
        }
    )


class AliasRefused(RuntimeError):
    """A manual promote or rollback that would move champion onto an unverified version."""


def promote_version(name: str, version: str, reason: str, force_unverified: bool = False) -> str | None:
    """Move ``champion`` to ``version`` by hand (with the reason recorded in the champion history); only a version
    whose registry copy passed reload_same_logits. Returns the previous champion."""
    diff = mlflow_store.reload_diff(name, version)
    if (diff is None or not diff < RELOAD_TOLERANCE) and not force_unverified:
        raise AliasRefused(
            f"{name} v{version} has no passing reload_same_logits record ({diff}): materialize registered_model "
            "for it first"
        )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return mlflow_store.move_champion(name, version, f"manual promote: {reason}", now)


def rollback(name: str, reason: str) -> tuple[str, str]:
    """Give ``champion`` back to the version that held it before the current one (from the champion history).
    Returns (from version, to version)."""
    current = mlflow_store.champion(name)
    if current is None:
        raise AliasRefused(f"{name} has no champion to roll back")
    history = mlflow_store.champion_history(name)
    previous = next(
        (h["previous"] for h in reversed(history) if h["version"] == current.version and h["previous"]), None
    )
    if previous is None or previous == current.version:
        raise AliasRefused(f"{name} v{current.version} has no earlier champion in its history")
    promote_version(name, previous, f"rollback from v{current.version}: {reason}")
    return current.version, previous
