"""Shared fixtures: a tiny real model (SmolLM2's tokenizer, random 2-layer llama) and isolated state roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune_pipeline.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture()
def state_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh FINETUNE_HOME for one test."""
    root = tmp_path / "state"
    monkeypatch.setenv("FINETUNE_HOME", str(root))
    return root


def chat_row(i: int, answer: str | None = None, rid: str | None = None) -> dict:
    return {
        "id": rid or f"r{i}",
        "messages": [
            {"role": "system", "content": "Classify."},
            {"role": "user", "content": f"Ticket {i}: my CloudSync export fails with error E{i}"},
            {"role": "assistant", "content": answer or json.dumps({"category": "technical", "n": i})},
        ],
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_spec(**sections: dict):  # type: ignore[no-untyped-def]
    """A PipelineSpec with test defaults; ``sections`` override whole spec sections (source, cleaning, ...)."""
    from finetune_pipeline.spec import PipelineSpec

    raw = {"name": "t", "source": {"incoming_dir": "in"}, "registry": {"model_name": "m"}}
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return PipelineSpec.model_validate(raw)


def prepared_splits(  # type: ignore[no-untyped-def]
    tmp_path: Path,
    name: str,
    base: Path | None,
    messages: list[str],
    n_train: int,
    n_val: int,
    *,
    digests: dict[str, str] | None = None,
    version: str = "v",
):
    """The one builder of a prepared-splits world: pipeline ``name``'s state under ``tmp_path/state`` as
    dataset_splits and base_model leave it. The rows are split in order (train, validation, the rest test) with the
    manifest and its counts (``digests`` default to each split's name, the version to ``version``); the base model
    record when ``base`` is given; an empty ``tmp_path/dagster`` for a test instance. Called again, it rewrites the
    splits (a grown test split, say). Returns the pipeline's layout."""
    import pandas as pd

    from finetune_pipeline.layout import BaseModelRecord, PipelineLayout, SplitsManifest

    layout = PipelineLayout(tmp_path / "state", name)
    layout.splits.mkdir(parents=True, exist_ok=True)
    n = len(messages)
    frame = pd.DataFrame(
        {
            "row_id": [f"r{i}" for i in range(n)],
            "messages": messages,
            "drop": "d",
            "source_line": range(n),
            "content_hash": [f"h{i}" for i in range(n)],
            "label": None,
        }
    )
    cut = n_train + n_val
    parts = {"train": frame[:n_train], "validation": frame[n_train:cut], "test": frame[cut:]}
    for split, part in parts.items():
        part.reset_index(drop=True).to_parquet(layout.split(split))
    counts = {s: len(p) for s, p in parts.items()}
    SplitsManifest(
        drops=["d"], digests=digests or {s: s for s in parts}, version=version, counts=counts, spec_hash="s"
    ).save(layout.splits_manifest)
    if base is not None:
        BaseModelRecord(path=str(base), kind="local", digest="w", source="x", tokenizer_dir=str(base)).save(
            layout.base_model
        )
    (tmp_path / "dagster").mkdir(exist_ok=True)
    return layout


def local_resources(tmp_path: Path) -> dict:
    """The Dagster resources on the real local stores under ``tmp_path`` (state, MLflow on SQLite, Optuna)."""
    from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore

    return {
        "state": StateStore(root=str(tmp_path / "state")),
        "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        "optuna": OptunaStorage(),
    }


@pytest.fixture(autouse=True)
def _no_stale_dagster_defs_state_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dagster keeps the current defs-state storage in a context variable (a private one); an instance that is gone
    can leave it set, and the next definitions load in the same process then fails with "Attempted to resolve
    undefined DagsterInstance weakref" (seen in the full suite, never in a file alone). Each test starts without it,
    and a storage whose instance is gone reads as none."""
    from dagster._core.storage.defs_state.base import DefsStateStorage, _current_storage

    _current_storage.set(None)

    def live_storage(cls):  # type: ignore[no-untyped-def]
        storage = _current_storage.get()
        ref = getattr(storage, "_instance_weakref", None)
        return storage if storage is not None and (ref is None or ref() is not None) else None

    monkeypatch.setattr(DefsStateStorage, "get", classmethod(live_storage))
