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
