"""Sweep benchmark, one run on this machine: (a) the same trials 1 at a time vs 2 at a time (wall time), and
(b) the median pruner vs none on the same sampled trials (training steps spent and best validation loss).

    python bench/sweep_bench.py [--model smollm2-135m-instruct] [--trials 4] [--steps 6]

Trials are real child processes (`finetune_pipeline.tuning.trial_child`) sharing one SQLite Optuna storage, as the
hyperparameter_sweep asset runs them (there through Dagster Pipes, here as plain subprocesses). Results go to
.finetune/bench/sweep_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    from examples.demo_tickets import generate_tickets
    from finetune_pipeline.models.base import provision_base_model
    from finetune_pipeline.tuning.sweep import run_sweep
    from finetune_pipeline_tests.conftest import make_spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / ".finetune" / "bench" / "sweep_bench.json"))
    a = ap.parse_args()
    base = provision_base_model(a.model).path
    rows = [json.dumps(r["messages"]) for r in generate_tickets(80, seed=3)]
    tmp = Path(tempfile.mkdtemp(prefix="sweep_bench_"))

    def sweep(name: str, **settings: object) -> tuple[float, object]:
        space = {"learning_rate": {"type": "float", "low": 1e-5, "high": 3e-3, "log": True}}
        spec = make_spec(
            model={"base": base, "dtype": "auto", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            training={"per_device_train_batch_size": 4, "max_length": 320, "seed": 1},
            runtime={"logging_steps": 1, "save_steps": 0, "calibration_steps": 0, "eos_check_samples": 0},
            sweep={
                "enabled": True,
                "n_trials": a.trials,
                "max_steps": a.steps,
                "eval_steps": 2,
                "seed": 5,
                "search_space": space,
                **settings,
            },
        )
        t0 = time.perf_counter()
        res = run_sweep(
            study_name=name,
            base_path=base,
            spec=spec,
            train_messages=rows[:64],
            val_messages=rows[64:],
            storage_uri=f"sqlite:///{tmp / 'optuna.db'}",
            work_dir=tmp / name,
            log=lambda m: None,
        )
        return time.perf_counter() - t0, res

    report: dict[str, object] = {"model": a.model, "trials": a.trials, "steps_per_trial": a.steps}
    one_s, one = sweep("serial", parallel_trials=1, pruner="none")
    two_s, two = sweep("parallel", parallel_trials=2, pruner="none")
    report["a_parallel"] = {
        "one_at_a_time_s": round(one_s, 1),
        "two_at_a_time_s": round(two_s, 1),
        "speedup": round(one_s / two_s, 2),
        "best_value": [one.best_value, two.best_value],  # type: ignore[attr-defined]
    }
    none_s, unpruned = sweep("unpruned", pruner="none", n_trials=2 * a.trials)
    pr_s, pruned = sweep("pruned", pruner="median", n_trials=2 * a.trials)
    report["b_pruning"] = {
        "unpruned": {
            "trial_steps": unpruned.trial_steps,
            "best_value": unpruned.best_value,
            "seconds": round(none_s, 1),
        },  # type: ignore[attr-defined]
        "pruned": {
            "trial_steps": pruned.trial_steps,
            "best_value": pruned.best_value,
            "n_pruned": pruned.n_pruned,  # type: ignore[attr-defined]
            "seconds": round(pr_s, 1),
        },
        "steps_ratio": round(pruned.trial_steps / max(1, unpruned.trial_steps), 2),  # type: ignore[attr-defined]
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
