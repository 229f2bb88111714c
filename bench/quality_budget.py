"""Quality per minute: the held-out exact match this tree's asset reaches in 5 minutes of training against what
today's asset (the tree at --baseline) reaches in 15, on the compositional NL->SQL task (``bench/sql_task.py``:
held-out questions combine two filter fields never seen together in training).

Both arms are the adapter asset's own training child with each tree's defaults (dtype auto, LoRA r16 all-linear,
batch 8, each tree's default learning rate, LoRA dropout and attention), 400 planned steps (the issue's case) and
``training.max_minutes`` as the only stop (the calibration steps measure the step time and cap the steps). Each
adapter is scored the same way, by this tree's evaluation generation (greedy, the adapter's saved chat template):
exact match of the SQL (whitespace-normalised) on the held-out rows and on as many seen-shape rows.

    python bench/quality_budget.py [--minutes-new 5] [--minutes-today 15] [--rows 1911] [--heldout 60]
        [--baseline dc4102f] [--out bench/results/quality_budget.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.train_bench import baseline_tree, load_note, run_child  # noqa: E402


def exact_match(base: str, adapter: str, rows: list[str], batch: int = 16) -> float:
    """Share of rows whose greedy answer equals the reference SQL (whitespace-normalised)."""
    from finetune_pipeline.models.base import load_for_eval
    from finetune_pipeline.models.chat_generation import generate_answers
    from finetune_pipeline.spec import ModelSpec

    model, tok = load_for_eval(base, ModelSpec(dtype="float32"), adapter)
    chats = [json.loads(r) for r in rows]
    answers, _ = generate_answers(model, tok, [c[:-1] for c in chats], max_new_tokens=64, batch_size=batch)
    norm = lambda s: " ".join(s.split()).rstrip(";").strip()  # noqa: E731
    return sum(norm(a) == norm(c[-1]["content"]) for a, c in zip(answers, chats, strict=True)) / len(chats)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes-new", type=float, default=5)
    ap.add_argument("--minutes-today", type=float, default=15)
    ap.add_argument("--rows", type=int, default=1911)
    ap.add_argument("--heldout", type=int, default=60)
    ap.add_argument("--baseline", default="dc4102f")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quality_budget.json"))
    args = ap.parse_args()
    os.environ.setdefault("FINETUNE_HOME", str(REPO / ".finetune"))
    from bench.sql_task import make_rows
    from finetune_pipeline.models.base import provision_base_model

    base = provision_base_model("smollm2-135m-instruct").path
    tmp = Path(tempfile.mkdtemp(prefix="quality_budget_"))
    old = baseline_tree(args.baseline, tmp)
    train, held = make_rows(args.rows, args.heldout, seed=3)
    seen = make_rows(args.heldout, 0, seed=4)[0]  # fresh rows of the training shapes
    lora = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
    report: dict[str, Any] = {"rows": args.rows, "heldout": args.heldout, "load_start": load_note(), "arms": {}}
    for arm, minutes, code in (("today", args.minutes_today, old), ("new", args.minutes_new, REPO)):
        training = {"max_steps": 400, "max_minutes": minutes, "per_device_train_batch_size": 8, "seed": 42}
        t0 = time.perf_counter()
        res = run_child(base, {"lora": lora}, training, train, tmp / arm, True, code, calibration_steps=2)
        took = time.perf_counter() - t0
        row = {
            "minutes": minutes,
            "steps": res["steps"],
            "budget_steps": res.get("budget_steps"),
            "epochs": round(res["steps"] * 8 / args.rows, 3),
            "tokens_per_second": res["tokens_per_second"],
            "seconds_per_step": res.get("seconds_per_step"),
            "learning_rate": res.get("learning_rate"),
            "child_seconds": round(took, 1),
            "heldout_exact_match": exact_match(base, res["adapter"], held),
            "seen_shape_exact_match": exact_match(base, res["adapter"], seen),
            "load_end": load_note(),
        }
        report["arms"][arm] = row
        print(arm, json.dumps(row), flush=True)
    print("base", json.dumps({"heldout_exact_match": exact_match(base, None, held)}), flush=True)  # type: ignore[arg-type]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
