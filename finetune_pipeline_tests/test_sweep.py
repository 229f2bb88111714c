"""Integration tier: the sweep's trials share one Optuna storage (SQLite in a temp folder): several at once in
child processes, pruned from their own reports, and a killed sweep resumes with its finished trials kept. One
trial at a time runs in this process (``in_process_launch``: the same trial code without a child's start-up and
imports); the child-process launch is proven by the parallel test and the asset's Pipes test."""

import json
from pathlib import Path

import pytest

from finetune_pipeline_tests.conftest import chat_row, local_resources, make_spec, prepared_splits

ROWS = [json.dumps(chat_row(i)["messages"]) for i in range(40)]
LORA = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
TRAIN = {"per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_length": 96, "seed": 3}
RUNTIME = {"logging_steps": 1, "save_steps": 0, "calibration_steps": 0, "eos_check_samples": 0}

pytestmark = pytest.mark.integration


def _sweep(
    tmp_path: Path, tiny_model: Path, study: str, evaluation: dict | None = None, children: bool = False, **sweep
):  # type: ignore[no-untyped-def]
    from finetune_pipeline.tuning.sweep import in_process_launch, run_sweep, subprocess_launch

    space = {"learning_rate": {"type": "categorical", "choices": [5e-3, 2e-3, 1e-9]}}
    settings = {"enabled": True, "max_steps": 4, "eval_steps": 1, "search_space": space, **sweep}
    spec = make_spec(model=LORA, training=TRAIN, runtime=RUNTIME, sweep=settings, evaluation=evaluation or {})
    reports: list = []
    res = run_sweep(
        study_name=study,
        base_path=str(tiny_model),
        spec=spec,
        train_messages=ROWS[:32],
        val_messages=ROWS[32:],
        storage_uri=f"sqlite:///{tmp_path / 'optuna.db'}",
        work_dir=tmp_path / "sweep",
        log=lambda m: None,
        on_trial=reports.append,
        launch=subprocess_launch if children else in_process_launch,
    )
    return res, reports


def _study(tmp_path: Path, name: str):  # type: ignore[no-untyped-def]
    import optuna

    return optuna.create_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}", load_if_exists=True)


def test_parallel_trials_run_at_once_in_child_processes(tmp_path: Path, tiny_model: Path) -> None:
    from finetune_pipeline.tuning.trials import OUTCOME_FILE, TrialOutcome

    res, reports = _sweep(tmp_path, tiny_model, "par", children=True, n_trials=3, parallel_trials=2, pruner="none")
    assert res.n_complete == 3 and res.n_run_now == 3 and len(reports) == 3
    outs = [TrialOutcome.load(tmp_path / "sweep" / f"trial-{n}" / OUTCOME_FILE) for n in range(3)]
    assert all(o.state == "COMPLETE" and o.steps == 4 for o in outs)
    a, b = outs[0], outs[1]  # the first two started together
    assert a.started < b.ended and b.started < a.ended, "two trials should have trained at the same time"
    assert res.trial_steps == 12


def test_the_pruner_stops_a_bad_trial_from_its_own_reports(tmp_path: Path, tiny_model: Path) -> None:
    study = _study(tmp_path, "prune")
    for lr in (5e-3, 2e-3, 1e-9):  # two good trials first, then one that cannot learn
        study.enqueue_trial({"learning_rate": lr})
    res, reports = _sweep(tmp_path, tiny_model, "prune", n_trials=3, parallel_trials=1, pruner="median")
    assert [r.state for r in reports] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert res.n_pruned == 1 and res.trial_steps < 3 * 4  # the pruned trial stopped before its last step
    assert res.best_params["learning_rate"] != pytest.approx(1e-9)


def test_a_killed_sweep_resumes_keeping_finished_trials_and_retrying_the_interrupted(
    tmp_path: Path, tiny_model: Path
) -> None:
    import optuna

    first, _ = _sweep(tmp_path, tiny_model, "resume", n_trials=1, pruner="none")
    study = _study(tmp_path, "resume")
    study.enqueue_trial({"learning_rate": 2e-3})
    lr = optuna.distributions.CategoricalDistribution([5e-3, 2e-3, 1e-9])
    killed = study.ask({"learning_rate": lr})  # what a sweep killed mid-trial leaves: a RUNNING trial
    assert killed.params == {"learning_rate": 2e-3}
    res, reports = _sweep(tmp_path, tiny_model, "resume", n_trials=2, pruner="none")
    states = {t.number: t.state for t in study.trials}
    assert states[0] == optuna.trial.TrialState.COMPLETE  # kept, not re-run
    assert states[killed.number] == optuna.trial.TrialState.FAIL  # marked failed ...
    assert [(r.params, r.state) for r in reports] == [({"learning_rate": 2e-3}, "COMPLETE")]  # ... and retried
    assert res.n_complete == 2 and res.n_run_now == 1 and first.n_complete == 1


def test_a_task_metric_can_be_the_objective(tmp_path: Path, tiny_model: Path) -> None:
    """sweep.objective: a per-row metric; trials are scored by greedy answers on validation rows, in its direction."""
    import optuna

    from finetune_pipeline.tuning.trials import OUTCOME_FILE, TrialOutcome

    res, reports = _sweep(
        tmp_path,
        tiny_model,
        "metric",
        evaluation={"metrics": ["token_f1", "perplexity"], "primary_metric": "token_f1", "max_new_tokens": 4},
        n_trials=2,
        pruner="none",
        objective="token_f1",
        objective_samples=3,
    )
    study = _study(tmp_path, "metric")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE and res.n_complete == 2
    outs = [TrialOutcome.load(tmp_path / "sweep" / f"trial-{n}" / OUTCOME_FILE) for n in range(2)]
    assert all(o.value is not None and 0.0 <= o.value <= 1.0 and o.eval_loss is not None for o in outs)
    assert res.best_value == max(o.value for o in outs)  # type: ignore[type-var]


def test_the_objective_must_be_a_listed_per_row_metric() -> None:
    from finetune_pipeline.spec import SpecError, parse_spec

    base = "name: p\nsource: {incoming_dir: in}\nregistry: {model_name: m}\n"
    with pytest.raises(SpecError, match="sweep.objective 'perplexity' must be eval_loss or a per-row metric"):
        parse_spec(base + "sweep: {objective: perplexity}\n")


def test_the_sweep_asset_runs_parallel_trials_through_dagster_pipes(tmp_path: Path, tiny_model: Path) -> None:
    """Two trial children at once, each through its own Pipes session in the same step: their log lines reach the
    Dagster run and the study gets both trials."""
    import dagster as dg

    from finetune_pipeline.defs.training_assets import sweep_asset
    from finetune_pipeline.spec import parse_spec

    spec = parse_spec(
        f"name: sw\nsource: {{incoming_dir: in}}\nregistry: {{model_name: m}}\n"
        f"model: {{base: {tiny_model}, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}\n"
        "training: {per_device_train_batch_size: 4, max_length: 96}\n"
        "runtime: {logging_steps: 1, save_steps: 0, calibration_steps: 0, eos_check_samples: 0}\n"
        "sweep: {enabled: true, n_trials: 2, parallel_trials: 2, max_steps: 2, pruner: none, "
        "search_space: {learning_rate: {type: categorical, choices: [0.005, 0.002]}}}\n",
        path=tmp_path / "sw.yaml",
    )
    prepared_splits(tmp_path, "sw", tiny_model, ROWS, 32, 4)
    resources = local_resources(tmp_path)
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        res = dg.materialize([sweep_asset(spec)], instance=instance, resources=resources)
        assert res.success
        meta = res.get_asset_materialization_events()[0].materialization.metadata
        assert meta["trials_complete"].value == 2 and meta["trials_run_now"].value == 2
        logs = [e.message for e in instance.all_logs(res.run_id) if e.message]
    assert any(m.startswith("trial 0: ") and "step" in m for m in logs)  # streamed from the children through Pipes
    assert any(m.startswith("trial 1: ") and "step" in m for m in logs)


def test_sweep_uses_persistent_storage_and_resumes(tiny_model: Path, tmp_path: Path) -> None:
    import optuna

    from finetune_pipeline.tuning.sweep import TrialReport, in_process_launch, run_sweep

    spec = make_spec(
        model=LORA,
        training={**TRAIN, "max_length": 128},
        runtime=RUNTIME,
        sweep={
            "enabled": True,
            "n_trials": 2,
            "max_steps": 2,
            "pruner": "none",
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
                "lora.r": {"type": "categorical", "choices": [2, 4]},
            },
        },
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    reports: list[TrialReport] = []
    kw = dict(
        study_name="p-d1",
        base_path=str(tiny_model),
        spec=spec,
        train_messages=ROWS[:24],
        val_messages=ROWS[32:],
        storage_uri=storage,
        work_dir=tmp_path / "sweep",
        log=lambda m: None,
        on_trial=reports.append,
        launch=in_process_launch,
    )
    first = run_sweep(**kw)
    assert first.n_complete == 2 and first.n_run_now == 2 and first.study_name == "p-d1"
    assert set(first.best_params) == {"learning_rate", "lora.r"}
    # every finished trial was reported, with the curve of its 2 steps (runtime.logging_steps 1)
    assert [(r.number, r.state) for r in reports] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert all(set(r.params) == {"learning_rate", "lora.r"} for r in reports)
    assert [s for s, _ in reports[0].loss_history] == [1, 2] and reports[0].tokens_per_second > 0
    assert min(r.eval_loss for r in reports) == pytest.approx(first.best_value)
    study = optuna.load_study(study_name=first.study_name, storage=storage)
    assert study.best_value == pytest.approx(first.best_value)
    again = run_sweep(**kw)  # same study name: the stored trials count, nothing reruns
    assert again.n_run_now == 0 and again.best_params == first.best_params and len(reports) == 2
    assert run_sweep(**{**kw, "study_name": "p-d2"}).n_run_now == 2
