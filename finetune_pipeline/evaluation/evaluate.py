"""Evaluate base and tuned model on the test split and build the report."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from pathlib import Path

from finetune_pipeline.evaluation.generate import ModelOutputs, run_model
from finetune_pipeline.evaluation.report import EvalReport, build_report
from finetune_pipeline.models.base import load_for_eval
from finetune_pipeline.spec import EvaluationSpec, ModelSpec


def _outputs(
    base_path: str,
    model: ModelSpec,
    adapter: str | None,
    rows: list[str],
    spec: EvaluationSpec,
    log: Callable[[str], None],
) -> ModelOutputs:
    m, tok = load_for_eval(base_path, model, adapter)
    try:
        return run_model(m, tok, rows, spec, log)
    finally:
        del m
        gc.collect()


def evaluate(
    base_path: str,
    model: ModelSpec,
    tuned_path: str,
    test_messages: list[str],
    spec: EvaluationSpec,
    base_cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> EvalReport:
    """Run both models on up to ``spec.max_samples`` test rows. Base outputs are cached in ``base_cache``
    (keyed by the caller on base weights, test data and eval settings), so retraining does not regenerate them."""
    rows = test_messages[: spec.max_samples]
    if not rows:
        raise ValueError("the test split is empty: add data or raise split.test_fraction")
    parsed = [json.loads(r) for r in rows]
    refs = [p[-1]["content"] for p in parsed]
    prompts = [next(m["content"] for m in reversed(p[:-1]) if m["role"] == "user") for p in parsed]
    if base_cache is not None and base_cache.exists():
        base = ModelOutputs(**json.loads(base_cache.read_text()))
        log(f"base model outputs reused from {base_cache}")
    else:
        log(f"base model: generating {len(rows)} answers")
        base = _outputs(base_path, model, None, rows, spec, log)
        if base_cache is not None:
            base_cache.parent.mkdir(parents=True, exist_ok=True)
            base_cache.write_text(json.dumps(base.__dict__))
    log(f"tuned model: generating {len(rows)} answers")
    if model.method == "full":
        tuned = _outputs(tuned_path, model, None, rows, spec, log)
    else:
        tuned = _outputs(base_path, model, tuned_path, rows, spec, log)
    extra = lambda o: {"perplexity": o.perplexity, "eos_rate": sum(o.eos_reached) / len(o.eos_reached)}  # noqa: E731
    return build_report(spec, refs, prompts, base.predictions, tuned.predictions, extra(base), extra(tuned))
