"""Unit tier: cache keys hash whole spec sections; sweep overrides are applied once to the spec; code versions follow
the modules a stage really uses."""

import shutil
from pathlib import Path

import pytest

from finetune_pipeline import keys
from finetune_pipeline.layout import BaseModelRecord, SplitsManifest
from finetune_pipeline.spec import PipelineSpec
from finetune_pipeline_tests.conftest import make_spec

pytestmark = pytest.mark.unit

MANIFEST = SplitsManifest(
    drops=["d1"], digests={"train": "a", "validation": "b", "test": "c"}, version="v1", counts={}, spec_hash="s"
)
BASE = BaseModelRecord(path="/m", kind="local", digest="w1", source="/m", tokenizer_dir="/m")


def adapter_key(spec: PipelineSpec) -> str:
    return keys.adapter_key(MANIFEST, BASE, spec, "code")


@pytest.mark.parametrize(
    ("section", "change"),
    [
        ("runtime", {"logging_steps": 1}),
        ("runtime", {"save_steps": 7}),
        ("runtime", {"launcher": "accelerate"}),
        ("runtime", {"min_eos_rate": 0.1}),
        ("registry", {"min_improvement_over_base": 0.5}),
        ("evaluation", {"max_samples": 3}),
        ("automation", {"retrain_cron": None}),
    ],
)
def test_settings_that_do_not_change_what_is_learned_keep_the_adapter(section: str, change: dict) -> None:
    assert adapter_key(make_spec(**{section: change})) == adapter_key(make_spec())


@pytest.mark.parametrize(
    ("section", "change"),
    [
        ("training", {"learning_rate": 0.002}),
        ("training", {"max_steps": 61}),
        ("training", {"num_processes": 2}),
        ("model", {"lora": {"r": 8}}),
        ("model", {"dtype": "float32"}),
    ],
)
def test_what_is_learned_changes_the_adapter(section: str, change: dict) -> None:
    runtime = {"runtime": {"launcher": "accelerate"}} if change.get("num_processes") else {}
    assert adapter_key(make_spec(**{section: change}, **runtime)) != adapter_key(make_spec())


def test_with_overrides_equals_writing_the_value_into_the_spec() -> None:
    tuned = make_spec().with_overrides({"learning_rate": 3e-4, "lora.r": 8})
    assert tuned.training.learning_rate == 3e-4 and tuned.model.lora.r == 8
    assert tuned == make_spec(training={"learning_rate": 3e-4}, model={"lora": {"r": 8}})
    assert adapter_key(tuned) == adapter_key(make_spec(training={"learning_rate": 3e-4}, model={"lora": {"r": 8}}))
    assert tuned.searchable_values()["lora.r"] == 8
    with pytest.raises(ValueError, match="unknown parameter"):
        make_spec().with_overrides({"lora.rank": 8})
    with pytest.raises(ValueError, match="greater than 0"):
        make_spec().with_overrides({"lora.r": 0})


def test_eval_key_ignores_the_gate_and_follows_the_settings() -> None:
    a, b = make_spec(), make_spec(registry={"min_improvement_over_base": 0.3})
    assert keys.eval_key("k", "t", a.evaluation) == keys.eval_key("k", "t", b.evaluation)
    assert keys.eval_key("k", "t", a.evaluation) != keys.eval_key(
        "k", "t", make_spec(evaluation={"max_new_tokens": 9}).evaluation
    )
    assert keys.eval_key("k", "t", a.evaluation) != keys.eval_key("k", "t2", a.evaluation)


def test_sweep_study_hashes_the_trials_own_training_settings() -> None:
    sweep = {
        "enabled": True,
        "max_steps": 4,
        "search_space": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3}},
    }
    a = make_spec(sweep=sweep)
    study = keys.sweep_study("p", MANIFEST, BASE, a, "code")
    # the adapter's step count is not the trials' (they use sweep.max_steps); logging is not learning
    assert keys.sweep_study("p", MANIFEST, BASE, make_spec(sweep=sweep, training={"max_steps": 99}), "code") == study
    assert keys.sweep_study("p", MANIFEST, BASE, make_spec(sweep=sweep, runtime={"logging_steps": 1}), "code") == study
    assert keys.sweep_study("p", MANIFEST, BASE, make_spec(sweep={**sweep, "max_steps": 6}), "code") != study
    assert keys.sweep_study("p", MANIFEST.model_copy(update={"version": "v2"}), BASE, a, "code") != study


STAGES = {s: f"finetune_pipeline.stages.{s}" for s in ("adapter", "hyperparameter_sweep", "eval_report")}


def test_code_versions_cover_the_math_not_the_bookkeeping() -> None:
    adapter = keys.closure(STAGES["adapter"])
    assert "finetune_pipeline.training.child" in adapter  # run as a child process, which no import reaches
    assert "finetune_pipeline.training.sft" in adapter and "finetune_pipeline.models.base" in adapter
    for stage in STAGES.values():
        kept = keys.closure(stage)
        assert not {m for m in kept if m.startswith(("finetune_pipeline.cli", "finetune_pipeline.defs"))}
        assert not {m for m in kept if keys._bookkeeping(m)}, stage
        assert "finetune_pipeline.data.demo_tickets" not in kept


def _versions() -> dict[str, str]:
    keys.code_version.cache_clear()
    return {name: keys.code_version(stage) for name, stage in STAGES.items()}


@pytest.fixture()
def package_copy(tmp_path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A copy of the package that code versions are computed from, to edit freely."""
    root = tmp_path / "finetune_pipeline"
    shutil.copytree(keys._ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(keys, "_ROOT", root)
    yield root
    keys.code_version.cache_clear()


def test_rewording_the_spec_or_tracking_retrains_nothing_editing_the_loss_retrains_the_adapter(
    package_copy: Path,
) -> None:
    before = _versions()
    spec = package_copy / "spec.py"
    text = spec.read_text()
    assert 'description="' in text
    spec.write_text(text.replace('description="', 'description="Reworded. ', 1))
    for tracking in (package_copy / "tracking").rglob("*.py"):
        tracking.write_text(tracking.read_text() + "\n# a reworded log line\n")
    assert _versions() == before
    loss = next(p for p in package_copy.rglob("*.py") if "def lean_loss" in p.read_text())
    loss.write_text(loss.read_text().replace("def lean_loss", "# the loss, edited\ndef lean_loss", 1))
    after = _versions()
    assert after["adapter"] != before["adapter"]
    assert after["hyperparameter_sweep"] != before["hyperparameter_sweep"]  # the trials train with it too
    assert after["eval_report"] == before["eval_report"]
