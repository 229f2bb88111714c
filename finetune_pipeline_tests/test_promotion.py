"""Tier 2: the evaluate and register stages against real MLflow in a temporary folder. Challenger and champion
are scored on the same rows; a copy of the champion or a worse model is never promoted; a grown test split
re-scores the champion; the version carries its evidence and model card."""

import json
import shutil
from pathlib import Path

import pytest

from finetune_pipeline.layout import AdapterRecord, BaseModelRecord, PipelineLayout
from finetune_pipeline.spec import RuntimeSpec, TrainingSpec, parse_spec
from finetune_pipeline.tracking.mlflow_store import Lineage, TrackingTarget
from finetune_pipeline.tracking.tracker import Tracker
from finetune_pipeline_tests.conftest import chat_row, prepared_splits

pytestmark = pytest.mark.integration

SPEC = """
name: prom
description: test pipeline
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, dtype: float32, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
evaluation: {{primary_metric: perplexity, metrics: [perplexity, exact_match, token_f1], max_samples: 16,
             max_new_tokens: 6, batch_size: 8, n_report_samples: 3, bootstrap_seed: {seed},
             forgetting: {{enabled: {forgetting}}}}}
registry: {{model_name: prom-model}}
"""


def _spec(tmp_path: Path, tiny_model: Path, seed: int = 0, forgetting: bool = False):  # type: ignore[no-untyped-def]
    text = SPEC.format(model=tiny_model, seed=seed, forgetting=str(forgetting).lower())
    return parse_spec(text, path=tmp_path / "prom.yaml")


def _splits(layout: PipelineLayout, n_test: int, digest: str) -> list[str]:
    """Train, validation and ``n_test`` test rows as dataset_splits leaves them; the test split's digest is
    ``digest``. Returns the training rows."""
    rows = [json.dumps(chat_row(i)["messages"]) for i in range(26 + n_test)]
    digests = {"train": "tr", "validation": "va", "test": digest}
    prepared_splits(layout.state.root.parent, layout.name, None, rows, 24, 2, digests=digests, version=digest)
    return rows[:24]


def _world(tmp_path: Path, tiny_model: Path, **kw):  # type: ignore[no-untyped-def]
    spec = _spec(tmp_path, tiny_model, **kw)
    layout = PipelineLayout(tmp_path / "state", "prom")
    BaseModelRecord(
        path=str(tiny_model), kind="local", digest="b", source=str(tiny_model), tokenizer_dir=str(tiny_model)
    ).save(layout.base_model)
    train = _splits(layout, 12, "test-v1")
    tracker = Tracker(TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")), "prom")
    lin = Lineage("prom", "prom/x", "run-1", None, "c", spec.spec_hash)
    return spec, layout, train, tracker, lin


def _adapter(layout: PipelineLayout, spec, rows, key: str, lr: float, seed: int = 0, steps: int = 6) -> AdapterRecord:  # type: ignore[no-untyped-def]
    from finetune_pipeline.training.sft import TrainRequest, train

    out = layout.adapter(key)
    train(
        TrainRequest(
            base_path=spec.model.base,
            model=spec.model,
            training=TrainingSpec(
                max_steps=steps, per_device_train_batch_size=4, learning_rate=lr, max_length=96, seed=seed
            ),
            runtime=RuntimeSpec(logging_steps=1, save_steps=0, calibration_steps=0, eos_check_samples=0),
            train_messages=rows,
            eval_messages=[],
            output_dir=out,
        ),
        log=lambda m: None,
    )
    return _record(layout, spec, key, out)


def _record(layout: PipelineLayout, spec, key: str, path: Path) -> AdapterRecord:  # type: ignore[no-untyped-def]
    rec = AdapterRecord(
        adapter_key=key,
        path=str(path),
        train_run_id="",
        spec_hash=spec.spec_hash,
        code_version="c",
        base_weights_digest="b",
        splits_version="v",
        split_digests={"train": "tr", "test": "test-v1"},
        drops=["d"],
        params={},
    )
    rec.save(layout.adapter_record(key))
    return rec


def _eval_and_register(layout, spec, key, tracker, lin, logs=None):  # type: ignore[no-untyped-def]
    from finetune_pipeline.stages.eval_report import evaluate_adapter
    from finetune_pipeline.stages.register import register

    log = (lambda m: logs.append(m)) if logs is not None else (lambda m: None)
    out = evaluate_adapter(layout, spec, key, tracker, lin, log=log)
    return out, register(layout, spec, out.record.eval_key, tracker, lin, log=log)


@pytest.fixture(scope="module")
def champion_world(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):  # type: ignore[no-untyped-def]
    """A registered champion (v1), trained well enough to beat base on perplexity (shared by this module's
    tests: none of them may move the champion)."""
    tmp_path = tmp_path_factory.mktemp("prom")
    spec, layout, train, tracker, lin = _world(tmp_path, tiny_model)
    _adapter(layout, spec, train, "champ", lr=5e-3)
    out, reg = _eval_and_register(layout, spec, "champ", tracker, lin)
    assert reg.promoted and reg.reason == "no champion yet" and out.record.report.champion_version is None
    return spec, layout, train, tracker, lin, reg


def test_champion_copy_is_never_promoted_and_evidence_is_on_the_version(champion_world) -> None:  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    spec, layout, train, tracker, lin, first = champion_world
    copy = layout.adapter("copy")
    shutil.copytree(layout.adapter("champ"), copy)
    _record(layout, spec, "copy", copy)
    out, reg = _eval_and_register(layout, spec, "copy", tracker, lin)
    r = out.record.report
    assert r.champion_version == first.version and set(out.record.scores) == {"base", "tuned", "champion"}
    for m, iv in r.vs_champion.items():  # same weights, same rows: every delta is exactly 0
        assert iv.delta == iv.low == iv.high == 0.0, m
    assert not reg.promoted and "champion kept" in reg.reason and reg.champion_version == first.version
    client = MlflowClient(tracking_uri=tracker.target.tracking_uri, registry_uri=tracker.target.tracking_uri)
    assert str(client.get_model_version_by_alias("prom-model", "champion").version) == first.version
    mv = client.get_model_version("prom-model", reg.version)
    assert mv.tags["finetune.decision.promoted"] == "false"
    assert mv.tags["finetune.eval.champion_version"] == first.version
    assert mv.tags["finetune.eval.test_digest"] == "test-v1" and mv.tags["finetune.eval.n"] == "12"
    assert mv.tags["finetune.vs_champion.perplexity"].startswith("0 [0, 0]")
    assert "## Evaluation (12 test rows" in mv.description and "## Limits" in mv.description
    assert "champion v1" in out.markdown and "[+0.0000, +0.0000]" in out.markdown and out.plot[:4] == b"\x89PNG"


def _damaged(layout: PipelineLayout, spec, key: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    """The champion's adapter with seeded noise added to every LoRA weight: a deliberately worse model."""
    import torch
    from safetensors.torch import load_file, save_file

    out = layout.adapter(key)
    shutil.copytree(layout.adapter("champ"), out)
    f = out / "adapter_model.safetensors"
    gen = torch.Generator().manual_seed(seed)
    weights = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in load_file(f).items()}
    save_file(weights, f)
    _record(layout, spec, key, out)


@pytest.mark.parametrize("seed", range(5))
def test_a_worse_candidate_is_never_promoted(champion_world, seed: int) -> None:  # type: ignore[no-untyped-def]
    """A damaged adapter against the champion, five damage and bootstrap seeds: never promoted. (learning_rate 0
    is refused by the spec, so the damaged adapter is the deliberately worse model.)"""
    spec, layout, train, tracker, lin, first = champion_world
    spec = _spec(Path(spec.path).parent, Path(spec.model.base), seed=seed)
    _damaged(layout, spec, f"damaged-{seed}", seed)
    try:
        out, reg = _eval_and_register(layout, spec, f"damaged-{seed}", tracker, lin)
    except Exception as exc:  # the base gate may refuse it outright: also never promoted
        from finetune_pipeline.stages.register import GateFailed

        assert isinstance(exc, GateFailed), exc
        return
    assert out.record.report.vs_champion["perplexity"].high < 0  # clearly worse, and the interval says so
    assert not reg.promoted and reg.champion_version == first.version


def test_a_grown_test_split_rescores_the_champion_before_deciding(champion_world) -> None:  # type: ignore[no-untyped-def]
    spec, layout, train, tracker, lin, first = champion_world
    copy = layout.adapter("copy2")
    shutil.copytree(layout.adapter("champ"), copy)
    _record(layout, spec, "copy2", copy)
    logs: list[str] = []
    before, _ = _eval_and_register(layout, spec, "copy2", tracker, lin, logs)
    assert len(before.record.scores["champion"].predictions) == 12
    logs.clear()
    _splits(layout, 16, "test-v2")  # a new drop grew the test split
    after, reg = _eval_and_register(layout, spec, "copy2", tracker, lin, logs)
    assert any(f"champion v{first.version}: generating 16 answers" in m for m in logs)
    assert after.record.test_digest == "test-v2" and after.record.report.n_samples == 16
    assert len(after.record.scores["champion"].predictions) == 16
    assert after.record.report.vs_champion["perplexity"].n == 16 and not reg.promoted
    logs.clear()
    again, _ = _eval_and_register(layout, spec, "copy2", tracker, lin, logs)  # nothing changed: all cached
    assert again.reused and not any("generating" in m for m in logs)
    _splits(layout, 12, "test-v1")  # the module's other tests expect the first split


def test_the_champion_is_not_rescored_against_itself(champion_world) -> None:  # type: ignore[no-untyped-def]
    spec, layout, train, tracker, lin, first = champion_world
    logs: list[str] = []
    out, reg = _eval_and_register(layout, spec, "champ", tracker, lin, logs)
    assert out.reused and out.record.report.champion_version is None and not any("generating" in m for m in logs)
    # the decision recorded on the version for this evaluation stands: a rerun changes nothing in the registry
    assert reg.version == first.version and reg.promoted and reg.reason == first.reason
