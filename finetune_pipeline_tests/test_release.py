"""Tier 2: the release asset materialised with dg.materialize after a tiny pipeline registered a champion (real
MLflow on SQLite, real servers on 127.0.0.1): artifacts exported, scored on the evaluated rows with paired intervals,
load-tested, the check passing, numbers on the version's tags and card, files logged under the version's run."""

from pathlib import Path

import pytest

from finetune_pipeline.spec import parse_spec
from finetune_pipeline.tracking.mlflow_store import Lineage, TrackingTarget
from finetune_pipeline.tracking.tracker import Tracker
from finetune_pipeline_tests.test_promotion import _adapter, _eval_and_register, _splits

pytestmark = pytest.mark.integration

SPEC = """
name: prom
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, dtype: float32, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
evaluation: {{primary_metric: perplexity, metrics: [perplexity, token_f1], max_samples: 12, max_new_tokens: 6,
             batch_size: 12, forgetting: {{enabled: false}}}}
registry: {{model_name: rel-model}}
release: {{formats: [safetensors_bf16, gguf_q8_0], max_drop: {max_drop}, load_test_requests: 3,
          load_test_concurrency: [1, 2], load_test_max_tokens: 4, targets: [ollama, vllm]}}
"""


def test_release_of_the_champion(tmp_path: Path, tiny_model: Path) -> None:
    import dagster as dg
    from mlflow import MlflowClient

    from finetune_pipeline.defs.release_assets import release_asset
    from finetune_pipeline.layout import BaseModelRecord, PipelineLayout
    from finetune_pipeline_tests.conftest import local_resources

    # the drop allowed is in perplexity units, and a 2-layer random model's perplexity is in the hundreds or more:
    # the check is made lenient here (test_a_failing_artifact_is_named covers failing) and closeness asserted below
    spec = parse_spec(SPEC.format(model=tiny_model, max_drop=1e6), path=tmp_path / "prom.yaml")
    layout = PipelineLayout(tmp_path / "state", "prom")
    BaseModelRecord(
        path=str(tiny_model), kind="local", digest="b", source=str(tiny_model), tokenizer_dir=str(tiny_model)
    ).save(layout.base_model)
    train = _splits(layout, 12, "test-v1")
    target = TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "state/mlflow/artifacts"))
    tracker = Tracker(target, "prom")
    lin = Lineage("prom", "prom/x", "run-1", None, "c", spec.spec_hash)
    _adapter(layout, spec, train, "champ", lr=5e-3)
    _, reg = _eval_and_register(layout, spec, "champ", tracker, lin)
    assert reg.promoted

    res = dg.materialize([release_asset(spec)], resources=local_resources(tmp_path), raise_on_error=False)
    assert res.success, res.all_events
    mat = res.asset_materializations_for_node("prom__release")[0].metadata
    check = res.get_asset_check_evaluations()[0]
    assert check.check_name == "artifacts_match_evaluated" and check.passed
    rows = mat["artifacts"].value.records
    assert [r.data["format"] for r in rows] == ["safetensors_bf16", "gguf_q8_0"]
    for r in rows:
        assert r.data["size_mb"] > 0 and r.data["c1_p50_s"] > 0 and r.data["c2_tok_s"] > 0 and r.data["peak_rss_mb"] > 0
        assert r.data["vs_evaluated"].startswith(("+", "-"))
        assert r.data["largest_batch"] >= 1  # served by the serve engine, whose /health counts its batches
    evaluated = mat["evaluated_perplexity"].value
    for r in rows:  # bf16 and q8_0 rounding move perplexity a little, not a lot
        assert abs(r.data["perplexity"] / evaluated - 1) < 0.05, (r.data, evaluated)
    assert "transformers GGUF loader" in mat["loaders"].value["gguf_q8_0"]
    assert "TEMPLATE" in mat["modelfile"].value and "--enable-lora --lora-modules rel-model=" in mat["vllm_serve"].value

    client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
    mv = client.get_model_version("rel-model", reg.version)
    assert mv.tags["finetune.release.passed"] == "true"
    assert mv.tags["finetune.release.gguf_q8_0.vs_evaluated"].endswith("@0.95")
    assert "## Release artifacts" in mv.description and "## Evaluation" in mv.description  # card kept, extended
    model_id = tracker.logged_model_id("rel-model", reg.version)  # the artifacts live under the version's model
    assert model_id is not None
    logged = {a.path for a in client.list_logged_model_artifacts(model_id, "release")}
    assert {"release/safetensors-bf16", "release/gguf"} <= logged

    again = dg.materialize([release_asset(spec)], resources=local_resources(tmp_path))
    assert again.asset_materializations_for_node("prom__release")[0].metadata["reused"].value is True


def test_a_failing_artifact_is_named() -> None:
    """The check's rule on a record: an artifact whose lower bound is below -max_drop is listed with its interval."""
    from finetune_pipeline.evaluation.bootstrap import Interval
    from finetune_pipeline.evaluation.report import ModelScores
    from finetune_pipeline.release.export import Export
    from finetune_pipeline.release.score import ArtifactScore
    from finetune_pipeline.stages.release import ReleaseRecord

    def score(fmt: str, low: float) -> ArtifactScore:
        iv = Interval(
            metric="m",
            candidate=0.5,
            reference=0.52,
            delta=-0.02,
            low=low,
            high=0.01,
            confidence=0.95,
            n=40,
            resamples=100,
            seed=0,
        )
        empty = ModelScores(rows={}, nll=[], tokens=[], eos_rate=1.0, predictions=[])
        return ArtifactScore(
            format=fmt, loader="x", compute_dtype="float32", summary={}, vs_evaluated={"m": iv}, seconds=0, scores=empty
        )

    rec = ReleaseRecord(
        release_key="k",
        name="n",
        version="1",
        adapter_key="a",
        eval_key="e",
        primary_metric="m",
        max_drop=0.02,
        evaluated={"m": 0.52},
        export=Export(artifacts=[], merge_max_logit_diff=None),
        scores=[score("gguf_f16", -0.019), score("gguf_q8_0", -0.05)],
    )
    assert [f.split(":")[0] for f in rec.failures()] == ["gguf_q8_0"] and "[-0.0500, +0.0100]" in rec.failures()[0]
