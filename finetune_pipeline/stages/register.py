"""registered_model: log the merged chat model to the MLflow registry, verify the round trip, then decide on the
paired evidence of the evaluation and move aliases."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_pipeline.evaluation.report import EvalRecord, with_intervals
from finetune_pipeline.layout import AdapterRecord, PipelineLayout, Registration
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.stages.datasets import split_dataset
from finetune_pipeline.stages.eval_report import margins
from finetune_pipeline.tracking.mlflow_store import ADAPTER_TAG, Lineage
from finetune_pipeline.tracking.registry import MetricLink, ServedModel
from finetune_pipeline.tracking.tracker import Tracker
from finetune_pipeline.training.configs import batch_fields

RELOAD_TOLERANCE = 1e-3
# MLflow models-from-code: loaded by MLflow from the model folder, never imported by the package
_SERVING_CODE = Path(__file__).resolve().parent.parent / "models" / "served_model.py"


class GateFailed(RuntimeError):
    """The evaluation did not pass the registration gate: nothing is registered."""


class StoreUnavailable(RuntimeError):
    """The MLflow store could not be read or written in the middle of the step (locked, stopped, unreachable)."""


_STORE_MODULES = ("sqlalchemy", "sqlite3", "psycopg2", "psycopg", "pymysql", "requests", "urllib3")
_STORE_WORDS = ("database is locked", "OperationalError", "could not connect", "Connection refused", "server closed")


def store_failure(exc: BaseException) -> str | None:
    """A short reason when ``exc`` (or what caused it) is the store failing rather than a bug or bad input."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if type(e).__module__.split(".")[0] in _STORE_MODULES or any(w in text for w in _STORE_WORDS):
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
            return first[:300]
        e = e.__cause__ or e.__context__
    return None


def _shown_uri(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


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
    tracker: Tracker,
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
    try:
        return _register_and_promote(layout, spec, ev, adapter, tracker, lineage, log)
    except Exception as exc:
        why = store_failure(exc)
        if why is None:
            raise
        raise StoreUnavailable(
            f"the MLflow store {_shown_uri(tracker.target.tracking_uri)} failed while registering adapter "
            f"{adapter.adapter_key} ({why}). Nothing half-done is served: a version gets challenger/champion only "
            f"after its reload check, and carries its evidence from the moment it exists. Bring the store back and "
            f"materialize {spec.name}/registered_model again: it finds the version by adapter key and finishes it."
        ) from exc


def _register_and_promote(
    layout: PipelineLayout,
    spec: LoadedSpec,
    ev: EvalRecord,
    adapter: AdapterRecord,
    tracker: Tracker,
    lineage: Lineage,
    log: LogFn,
) -> Registration:
    report = ev.report
    name, version, register_run = _register_once(layout, spec, ev, adapter, tracker, lineage, log)
    diff = _reload_diff(layout, spec, tracker, adapter, name, version)
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
        reg = _promote(reg, spec, tracker, ev, adapter)
    else:
        tracker.clear_aliases(name, version)
    reg.save(layout.registration)
    log(f"{name} v{version}: aliases {reg.aliases}; {reg.reason}")
    return reg


def _register_once(
    layout: PipelineLayout,
    spec: LoadedSpec,
    ev: EvalRecord,
    adapter: AdapterRecord,
    tracker: Tracker,
    lineage: Lineage,
    log: LogFn,
) -> tuple[str, str, str]:
    """(name, version, register run id): an adapter already registered is not registered again. A new version is
    made from an MLflow 3 LoggedModel whose source run is the training run (with its dataset inputs), carrying
    the training and evaluation metrics, each linked to the split (name, digest) it was measured on."""
    name = spec.registry.model_name
    existing = tracker.find_version(name, adapter.adapter_key)
    if existing is not None:
        log(f"adapter {adapter.adapter_key} is already registered as {name} v{existing.version}")
        return name, str(existing.version), existing.tags.get("finetune.register_run_id", "")
    from finetune_pipeline.evaluation.card import evidence_tags
    from finetune_pipeline.evaluation.promotion import decide

    s = spec.spec
    champ = tracker.champion(name)
    # the decision against the champion of now, on the version from the moment it exists (one write with it)
    first = decide("", ev.report, champ.version if champ else None, s.registry.promotion_min_delta, s.registry.floors)
    evidence = evidence_tags(ev, first, s.evaluation.bootstrap_seed, s.evaluation.bootstrap_resamples)
    links = {"finetune.eval_run_id": ev.run_id, "finetune.train_run_id": adapter.train_run_id}
    with tracker.run("register", lineage, **links) as run:
        tags = {
            ADAPTER_TAG: adapter.adapter_key,
            "finetune.train_run_id": adapter.train_run_id,
            "finetune.sweep_run_id": adapter.sweep_run_id,
            "finetune.eval_run_id": ev.run_id,
            "finetune.register_run_id": run.run_id,
            "finetune.spec_hash": spec.spec_hash,
            "finetune.splits_version": adapter.splits_version,
            **{f"finetune.dataset_digest.{sp}": d for sp, d in adapter.split_digests.items()},
            "finetune.drops": ",".join(adapter.drops),
            "finetune.base_model": spec.model.base,
            "finetune.base_weights_digest": adapter.base_weights_digest,
            "dagster.run_id": lineage.dagster_run_id,
            **evidence,
        }
        log("logging the merged chat model (weights, tokenizer with chat template, generation defaults) to MLflow")
        with _served_model(layout, spec, adapter) as served:
            new = tracker.register_version(
                name,
                served,
                source_run_id=adapter.train_run_id or run.run_id,
                params=_model_params(spec, adapter),
                version_tags=tags,
                metrics=_metric_links(spec, ev, adapter),
                input_of=(ev.run_id, run.run_id),
            )
        log(f"{name} v{new.version} from LoggedModel {new.model_id} (source run {new.source_run_id})")
        return name, new.version, run.run_id


@contextmanager
def _served_model(layout: PipelineLayout, spec: LoadedSpec, adapter: AdapterRecord) -> Iterator[ServedModel]:
    """The merged chat model in a temporary folder (weights, tokenizer with its chat template, the generation
    defaults evaluation used), with the serving code MLflow loads it with."""
    from finetune_pipeline.models import chat_generation
    from finetune_pipeline.models.merge import standalone_model
    from finetune_pipeline.tracking.registry import chat_signature

    e = spec.evaluation
    merged, tok = standalone_model(layout.read_base().path, spec.model, adapter.path)
    defaults = {
        "max_new_tokens": e.max_new_tokens,
        "temperature": 0.0,
        "batch_size": e.batch_size,
        "model_name": spec.registry.model_name,
    }
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "model"
        merged.save_pretrained(folder, safe_serialization=True)
        tok.save_pretrained(folder)
        (folder / "serving.json").write_text(json.dumps(defaults, indent=2))
        yield ServedModel(folder, _SERVING_CODE, [Path(chat_generation.__file__)], chat_signature(e.max_new_tokens))


def _model_params(spec: LoadedSpec, adapter: AdapterRecord) -> dict[str, Any]:
    """What the LoggedModel shows as its parameters: the trained-with values and the model settings."""
    m = spec.model
    lora = {} if m.method == "full" else {"lora.r": m.lora.r, "lora.alpha": m.lora.alpha}
    return {**adapter.params, "base_model": m.base, "method": m.method, **lora, "adapter_key": adapter.adapter_key}


def _metric_links(spec: LoadedSpec, ev: EvalRecord, adapter: AdapterRecord) -> list[MetricLink]:
    """Training loss on the train split, validation loss on the validation split (from the training run) and the
    evaluation scores on the test split (from the eval run)."""
    d = adapter.split_digests

    def on(split: str) -> Any:
        return split_dataset(spec, split, d[split]) if split in d else None

    scores = ("tuned.", "tuned_vs_base.", "tuned_vs_champion.")
    return [
        MetricLink(adapter.train_run_id, ("train_loss",), on("train")),
        MetricLink(adapter.train_run_id, ("eval_loss",), on("validation")),  # final value and the curve
        MetricLink(ev.run_id, scores, split_dataset(spec, "test", ev.test_digest)),
    ]


def _reload_diff(
    layout: PipelineLayout, spec: LoadedSpec, tracker: Tracker, adapter: AdapterRecord, name: str, version: str
) -> float:
    """Largest logit difference between the registry copy and the trained model, measured once per version."""
    diff = tracker.reload_diff(name, version)
    if diff is not None:
        return diff
    from finetune_pipeline.models.merge import max_logit_diff, tuned_model

    model, tok = tracker.load_version(name, version)
    diff = max_logit_diff(tuned_model(layout.read_base().path, spec.model, adapter.path), model, tok)
    tracker.record_reload_diff(name, version, diff)
    return diff


def _facts(spec: LoadedSpec, adapter: AdapterRecord) -> dict[str, str]:
    s = spec.spec
    t, lora = s.training, s.model.lora
    return {
        "base model": f"{s.model.base} (weights digest {adapter.base_weights_digest})",
        "method": f"{s.model.method}" + (f", LoRA r={lora.r} alpha={lora.alpha}" if s.model.method != "full" else ""),
        "training": f"{trained_steps(t, adapter.cost)}, learning_rate={adapter.cost.get('learning_rate') or t.learning_rate}, {batch_used(t, adapter.cost)}, max_length={t.max_length}, seed={t.seed}",
        "data digests": ", ".join(f"{k}={v}" for k, v in adapter.split_digests.items()),
        "drops": ", ".join(adapter.drops),
        "adapter key": adapter.adapter_key,
    }


def batch_used(t: Any, cost: dict[str, Any]) -> str:
    """The micro-batch and accumulation the adapter trained with (as its training child reported them; the spec's
    fields by their defaults for adapters that did not report them)."""
    micro, accumulation = batch_fields(t)
    micro = cost.get("micro_batch") or micro
    accumulation = cost.get("gradient_accumulation_steps") or accumulation
    return f"micro-batch={micro} x accumulation={accumulation}"


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


def _promote(
    reg: Registration, spec: LoadedSpec, tracker: Tracker, ev: EvalRecord, adapter: AdapterRecord
) -> Registration:
    """Decide on the paired evidence (same rows as the current champion), store the evidence and the model card
    on the version, then move the aliases."""
    from finetune_pipeline.evaluation.card import evidence_tags, model_card
    from finetune_pipeline.evaluation.promotion import decide

    s = spec.spec
    champ = tracker.champion(reg.name)
    recorded = tracker.version_tags(reg.name, reg.version)
    d = _recorded_decision(recorded, champ, reg.version, ev.eval_key) or decide(
        reg.version, ev.report, champ.version if champ else None, s.registry.promotion_min_delta, s.registry.floors
    )
    tags = evidence_tags(ev, d, s.evaluation.bootstrap_seed, s.evaluation.bootstrap_resamples)
    card = model_card(reg.name, reg.version, ev, d, _facts(spec, adapter), spec.description)
    tracker.record_evidence(reg.name, reg.version, tags, card)
    tracker.set_challenger(reg.name, reg.version)
    if d.promote and (champ is None or champ.version != reg.version):
        tracker.move_champion(reg.name, reg.version, d.reason, datetime.now(UTC).isoformat(timespec="seconds"))
    champion_score = (ev.report.champion or {}).get(reg.primary_metric)
    return reg.model_copy(
        update={
            "aliases": ["challenger"] + (["champion"] if d.promote else []),
            "promoted": d.promote,
            "champion_version": reg.version if d.promote else (champ.version if champ else None),
            "previous_champion": d.compared_with
            if champ and champ.version == reg.version
            else champ.version
            if champ
            else None,
            "previous_champion_score": champion_score,
            "reason": d.reason,
            "evidence": tags,
            "model_card": card,
        }
    )


def _recorded_decision(tags: dict[str, str], champ: Any, version: str, eval_key: str) -> Any:
    """The decision recorded on the version when it was registered, while it still holds: made on this same
    evaluation, and the champion is the one it was measured against, or is this version already (a step stopped
    after moving it). None: decide anew (a new evaluation of the same adapter, or another champion since)."""
    from finetune_pipeline.evaluation.promotion import Decision

    if "finetune.decision.promoted" not in tags or tags.get("finetune.eval.eval_key") != eval_key:
        return None
    against = tags.get("finetune.decision.compared_with", "")
    now = champ.version if champ else ""
    if now not in (against, version):
        return None
    reason = tags.get("finetune.decision.reason", "")
    return Decision(tags["finetune.decision.promoted"] == "true", reason, against or None)


class AliasRefused(RuntimeError):
    """A manual promote or rollback that would move champion onto an unverified version."""


def promote_version(
    tracker: Tracker, name: str, version: str, reason: str, force_unverified: bool = False
) -> str | None:
    """Move ``champion`` to ``version`` by hand (with the reason recorded in the champion history); only a version
    whose registry copy passed reload_same_logits. Returns the previous champion."""
    diff = tracker.reload_diff(name, version)
    if (diff is None or not diff < RELOAD_TOLERANCE) and not force_unverified:
        raise AliasRefused(
            f"{name} v{version} has no passing reload_same_logits record ({diff}): materialize registered_model "
            "for it first"
        )
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return tracker.move_champion(name, version, f"manual promote: {reason}", now)


def rollback(tracker: Tracker, name: str, reason: str) -> tuple[str, str]:
    """Give ``champion`` back to the version that held it before the current one (from the champion history).
    Returns (from version, to version)."""
    current = tracker.champion(name)
    if current is None:
        raise AliasRefused(f"{name} has no champion to roll back")
    history = tracker.champion_history(name)
    previous = next(
        (h["previous"] for h in reversed(history) if h["version"] == current.version and h["previous"]), None
    )
    if previous is None or previous == current.version:
        raise AliasRefused(f"{name} v{current.version} has no earlier champion in its history")
    promote_version(tracker, name, previous, f"rollback from v{current.version}: {reason}")
    return current.version, previous
