"""Evaluate base, tuned and the current champion on the same test rows and build the report."""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_pipeline.evaluation.generate import ModelOutputs, run_model, text_nll
from finetune_pipeline.evaluation.report import EvalReport, Forgetting, ModelScores, build_report, score_outputs
from finetune_pipeline.models.base import load_for_eval, load_trained
from finetune_pipeline.spec import EvaluationSpec, ForgettingSpec, ModelSpec

BUILTIN_PROBE = Path(__file__).with_name("probe_general.txt")
Loader = Callable[[], tuple[Any, Any]]


@dataclass(frozen=True)
class ChampionSource:
    """The current champion: its version, where its outputs are cached (by version and test digest), and how
    to load it (from its adapter when it is on this machine, else from the registry)."""

    version: str
    cache: Path
    load: Loader


def probe_passages(spec: ForgettingSpec) -> tuple[str, list[str]]:
    """(source, passages) of the forgetting probe: the built-in general-English text, or the user's file."""
    path = BUILTIN_PROBE if spec.probe == "builtin" else Path(spec.probe)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation.forgetting.probe: {path} not found; give a .txt file or 'builtin'")
    passages = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
    return (
        "builtin (finetune_pipeline/evaluation/probe_general.txt)" if spec.probe == "builtin" else str(path)
    ), passages


def _cached(
    cache: Path | None, make: Callable[[], ModelOutputs], what: str, log: Callable[[str], None]
) -> ModelOutputs:
    if cache is not None and cache.exists():
        log(f"{what} outputs reused from {cache}")
        return ModelOutputs.model_validate_json(cache.read_text())
    out = make()
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(out.model_dump_json())
    return out


def _run(
    load: Loader, rows: list[str], spec: EvaluationSpec, log: Callable[[str], None], probe: list[str]
) -> tuple[ModelOutputs, list[float], list[int]]:
    m, tok = load()
    try:
        out = run_model(m, tok, rows, spec, log)
        nll, count = text_nll(m, tok, probe) if probe else ([], [])
        return out, nll, count
    finally:
        del m
        gc.collect()


def _ppl(nll: list[float], count: list[int]) -> float:
    import math

    return math.exp(sum(nll) / sum(count)) if sum(count) else math.nan


def evaluate(
    base_path: str,
    model: ModelSpec,
    tuned_path: str,
    test_messages: list[str],
    spec: EvaluationSpec,
    confidence: float,
    margins_base: dict[str, float] | None = None,
    margins_champion: dict[str, float] | None = None,
    base_cache: Path | None = None,
    champion: ChampionSource | None = None,
    log: Callable[[str], None] = print,
) -> tuple[EvalReport, dict[str, ModelScores]]:
    """Run base, tuned and (when given) the champion on the same first ``spec.max_samples`` test rows. Base and
    champion outputs are cached (the caller keys them on weights, test rows and settings)."""
    rows = test_messages[: spec.max_samples]
    if not rows:
        raise ValueError("the test split is empty: add data or raise split.test_fraction")
    parsed = [json.loads(r) for r in rows]
    refs = [p[-1]["content"] for p in parsed]
    prompts = [next(m["content"] for m in reversed(p[:-1]) if m["role"] == "user") for p in parsed]
    source, probe = probe_passages(spec.forgetting) if spec.forgetting.enabled else ("", [])
    probe_cache = base_cache.with_suffix(".probe.json") if base_cache is not None else None
    outputs: dict[str, ModelOutputs] = {}
    probe_nll: dict[str, tuple[list[float], list[int]]] = {}

    def base_outputs() -> ModelOutputs:
        log(f"base model: generating {len(rows)} answers")
        out, nll, count = _run(lambda: load_for_eval(base_path, model, None), rows, spec, log, probe)
        if probe_cache is not None:
            probe_cache.parent.mkdir(parents=True, exist_ok=True)
            probe_cache.write_text(json.dumps({"nll": nll, "tokens": count}))
        probe_nll["base"] = (nll, count)
        return out

    outputs["base"] = _cached(base_cache, base_outputs, "base model", log)
    if "base" not in probe_nll and probe and probe_cache is not None and probe_cache.exists():
        raw = json.loads(probe_cache.read_text())
        probe_nll["base"] = (raw["nll"], raw["tokens"])
    log(f"tuned model: generating {len(rows)} answers")
    outputs["tuned"], *tuned_probe = _run(lambda: load_trained(base_path, model, tuned_path), rows, spec, log, probe)
    probe_nll["tuned"] = (tuned_probe[0], tuned_probe[1])
    if champion is not None:

        def champion_outputs() -> ModelOutputs:
            log(f"champion v{champion.version}: generating {len(rows)} answers on the same rows")
            return _run(champion.load, rows, spec, log, [])[0]

        outputs["champion"] = _cached(champion.cache, champion_outputs, f"champion v{champion.version}", log)
    scores = {k: score_outputs(v, refs, spec) for k, v in outputs.items()}
    forgetting = None
    if probe and "base" in probe_nll:
        forgetting = Forgetting(
            probe=source,
            passages=len(probe),
            base_perplexity=_ppl(*probe_nll["base"]),
            tuned_perplexity=_ppl(*probe_nll["tuned"]),
            max_ratio=spec.forgetting.max_perplexity_ratio,
        )
    report = build_report(
        spec,
        refs,
        prompts,
        scores,
        confidence,
        margins_base,
        margins_champion,
        champion.version if champion else None,
        forgetting,
    )
    if spec.judge.enabled:
        from finetune_pipeline.evaluation.judge import run_judge

        other = "champion" if "champion" in scores else "base"
        label = f"champion v{champion.version}" if champion else "base"
        log(f"LLM judge: tuned vs {label}")
        verdicts = run_judge(spec.judge, prompts, refs, scores["tuned"].predictions, scores[other].predictions, label)
        report = report.model_copy(update={"judge": verdicts})
    return report, scores
