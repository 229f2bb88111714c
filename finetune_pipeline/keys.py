"""Every cache key, in one module used by the assets and the schedule.

Keys hash whole spec sections, never a hand-kept list of fields: the spec is split by what a field affects
(``training`` and ``model`` are what is learned; ``runtime`` only launches and observes; ``registry`` decides), so
a key takes the sections that change its result. A stage's code version follows the math: it hashes the library
modules that compute the stage's result (``STAGE_CODE``) and every package module they import (function-level imports
included), but never the bookkeeping (``NOT_MATH``): the spec's source (its values are in the data keys already), the
tracking, the plots, the state layout and these keys. Rewording a field description or a log line retrains nothing;
editing the training loss retrains the adapter.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from finetune_pipeline import __version__
from finetune_pipeline.hashing import short_hash
from finetune_pipeline.layout import BaseModelRecord, SplitsManifest
from finetune_pipeline.spec import EvaluationSpec, PipelineSpec
from finetune_pipeline.tuning.sweep import trial_training

PACKAGE = "finetune_pipeline"
_ROOT = Path(__file__).resolve().parent

# Where a stage's math lives when not in the stage module itself (which then only orchestrates, logs and records).
# Training and the sweep trials run as child processes, which no import reaches.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    f"{PACKAGE}.stages.hyperparameter_sweep": (f"{PACKAGE}.tuning.sweep", f"{PACKAGE}.tuning.trial_child"),
    f"{PACKAGE}.stages.adapter": (f"{PACKAGE}.training.child",),
    f"{PACKAGE}.stages.eval_report": (f"{PACKAGE}.evaluation.evaluate",),
}
# Bookkeeping: recorded, not computed with. A module here (or under a package here) is neither hashed nor followed.
NOT_MATH = (
    PACKAGE,  # __init__: the package version, which every code version carries anyway
    f"{PACKAGE}.spec",
    f"{PACKAGE}.layout",
    f"{PACKAGE}.keys",
    f"{PACKAGE}.plots",
    f"{PACKAGE}.paths",
    f"{PACKAGE}.tracking",
    f"{PACKAGE}.stages.datasets",  # logs the splits to the tracking store
)


def _module_file(name: str) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return _ROOT / "__init__.py"
    for cand in (_ROOT.joinpath(*parts[:-1], parts[-1] + ".py"), _ROOT.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def _imports(name: str, path: Path) -> set[str]:
    """Package modules a module imports, at any depth of its code (function-level imports count)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith(PACKAGE):
                out.add(base)
                out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if _module_file(m) is not None}


def _bookkeeping(name: str) -> bool:
    return any(name == m or (m != PACKAGE and name.startswith(m + ".")) for m in NOT_MATH)


def closure(*modules: str) -> set[str]:
    """``modules`` (a stage module stands for its ``STAGE_CODE``) and every package module they reach by import,
    bookkeeping left out and not followed."""
    seen: set[str] = set()
    todo = [m for name in modules for m in STAGE_CODE.get(name, (name,))]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None or _bookkeeping(name):
            continue
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return seen


@functools.cache
def code_version(*modules: str) -> str:
    """Package version plus a hash of the source of ``closure(*modules)``: what computes the result."""
    parts = [(m, _module_file(m).read_text()) for m in sorted(closure(*modules))]  # type: ignore[union-attr]
    return f"{__version__}+{short_hash(parts, length=12)}"


def sweep_study(pipeline: str, manifest: SplitsManifest, base: BaseModelRecord, spec: PipelineSpec, code: str) -> str:
    """The Optuna study for the current data, base weights, code and search settings (sweep and adapter agree)."""
    inputs = short_hash(manifest.version, base.digest, code)
    scoring = spec.evaluation if spec.sweep.objective != "eval_loss" else None  # a metric objective depends on it
    settings = short_hash(spec.sweep, spec.model, trial_training(spec.training, spec.sweep), scoring, length=10)
    return f"{pipeline}-{inputs}-{settings}"


def adapter_key(manifest: SplitsManifest, base: BaseModelRecord, tuned: PipelineSpec, code: str) -> str:
    """What an adapter depends on: the splits, the base weights, what is learned (sweep overrides applied), the code."""
    return short_hash(manifest.version, base.digest, tuned.model, tuned.training, code)


def eval_key(adapter: str, test_digest: str, evaluation: EvaluationSpec, champion: str | None = None) -> str:
    """An evaluation: the adapter, the test rows, the evaluation settings and the champion it is compared with
    (``registered name/version``; gates are applied to it, not in it)."""
    if champion is None:
        return short_hash(adapter, test_digest, evaluation)
    return short_hash(adapter, test_digest, evaluation, champion)


def champion_outputs_key(champion: str, test_digest: str, spec: PipelineSpec) -> str:
    """A champion's cached outputs: the version (``name/version``), the test rows, the evaluation settings."""
    return short_hash(champion, test_digest, spec.evaluation, spec.model.dtype)


def base_outputs_key(base: BaseModelRecord, test_digest: str, spec: PipelineSpec) -> str:
    """The base model's cached outputs: its weights, the test rows, the evaluation settings, dtype and method."""
    return short_hash(base.digest, test_digest, spec.evaluation, spec.model.dtype, spec.model.method)


def training_fingerprint(drops: list[str], spec_hash: str) -> str:
    """What the next training run would learn from: the usable drops and the spec."""
    return short_hash(sorted(drops), spec_hash)
