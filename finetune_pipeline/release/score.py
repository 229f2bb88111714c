"""Score an exported artifact on the evaluation's test rows, through the evaluation's own generation and metrics,
and compare it with the evaluated model on the same rows (paired bootstrap).

Loaders: safetensors through transformers in the stored dtype (upcast to float32 for the matmuls where this CPU
computes that dtype far slower than float32: the stored weights' rounding is scored, the compute dtype is not);
GGUF through llama-cpp-python when it is installed and ``gguf_loader`` asks for it, else transformers' GGUF
loader (dequantised to float32: checks the tensors, layout and tokenizer metadata, not llama.cpp's kernels or
its tokenizer).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from finetune_pipeline.evaluation.bootstrap import Interval
from finetune_pipeline.evaluation.report import ModelScores, intervals, score_outputs
from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import EvaluationSpec


class ArtifactScore(BaseModel):
    """An artifact's scores on the evaluated rows and each metric's artifact - evaluated interval."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    format: str
    loader: str
    compute_dtype: str
    summary: dict[str, float]
    vs_evaluated: dict[str, Interval]
    seconds: float
    scores: ModelScores

    def passes(self, metric: str, max_drop: float) -> bool:
        iv = self.vs_evaluated[metric]
        return iv.low == iv.low and iv.low >= -max_drop  # NaN fails


def compute_dtype(stored: str) -> str:
    """The dtype the matmuls run in: the stored one where this machine runs it natively, else float32."""
    from finetune_pipeline.models.hardware import SlowDtypeError, choose_dtype

    try:
        return choose_dtype(stored, allow_slow=False).dtype
    except SlowDtypeError:
        return "float32"


def load_artifact(fmt: str, path: Path) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, loader, compute dtype) of an exported artifact."""
    if fmt.startswith("gguf"):
        from finetune_pipeline.release.gguf_export import load_gguf

        m, tok = load_gguf(path)
        return m, tok, "transformers GGUF loader (dequantised to float32)", "float32"
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_pipeline.models.base import load_tokenizer
    from finetune_pipeline.release.export import SAFETENSORS_DTYPES

    stored = SAFETENSORS_DTYPES[fmt]
    dt = compute_dtype(stored)
    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, stored), use_safetensors=True)
    if dt != stored:
        m = m.float()
    tok = load_tokenizer(str(path))
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    return m.eval(), tok, f"transformers ({stored} weights, {dt} compute)", dt


def score_artifact(
    fmt: str,
    path: Path,
    test_messages: list[str],
    evaluated: ModelScores,
    spec: EvaluationSpec,
    confidence: float,
    log: LogFn = print,
) -> ArtifactScore:
    """Generate on the same first ``spec.max_samples`` test rows the evaluation used, score them with the same
    metrics, and take paired intervals of artifact - evaluated model."""
    from finetune_pipeline.evaluation.generate import run_model

    rows = test_messages[: spec.max_samples]
    if len(rows) != len(evaluated.predictions):
        raise ValueError(
            f"{fmt}: {len(rows)} test rows now, {len(evaluated.predictions)} when the model was evaluated: the test "
            "split changed since; materialize eval_report and registered_model again"
        )
    import json

    refs = [json.loads(r)[-1]["content"] for r in rows]
    t0 = time.perf_counter()
    model, tok, loader, dt = load_artifact(fmt, path)
    try:
        log(f"{fmt}: scoring {len(rows)} test rows ({loader})")
        out = run_model(model, tok, rows, spec, log=lambda m: None)
    finally:
        del model
        gc.collect()
    scores = score_outputs(out, refs, spec)
    ivs = intervals(scores, evaluated, spec, confidence)
    return ArtifactScore(
        format=fmt,
        loader=loader,
        compute_dtype=dt,
        summary=scores.summary(spec.metrics),
        vs_evaluated=ivs,
        seconds=time.perf_counter() - t0,
        scores=scores,
    )
