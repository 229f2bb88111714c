"""Tier 1: cache keys hash whole spec sections; sweep overrides are applied once to the spec; code versions follow
the modules a stage really uses."""

import pytest

from finetune_pipeline import keys
from finetune_pipeline.layout import BaseModelRecord, SplitsManifest
from finetune_pipeline.spec import PipelineSpec
from finetune_pipeline_tests.conftest import make_spec

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


def test_code_versions_follow_the_modules_a_stage_uses() -> None:
    adapter = keys.code_version("finetune_pipeline.stages.adapter", "finetune_pipeline.training.child")
    assert adapter != keys.code_version("finetune_pipeline.stages.adapter")  # the child is run, not imported
    seen: set[str] = set()
    todo = ["finetune_pipeline.stages.adapter"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(keys._imports(name, keys._module_file(name)) - seen)  # type: ignore[arg-type]
    assert "finetune_pipeline.training.sft" in seen and "finetune_pipeline.tuning.sweep" in seen
    assert not {m for m in seen if m.startswith(("finetune_pipeline.cli", "finetune_pipeline.defs"))}
    assert "finetune_pipeline.data.demo_tickets" not in seen
