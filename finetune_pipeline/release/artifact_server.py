"""The release's loopback server for one exported artifact: ``finetune-pipeline serve``'s engine and OpenAI routes.

``python -m finetune_pipeline.release.artifact_server --format gguf_q8_0 --path model.gguf --port 8765`` loads the
artifact as the release scored it (``release.score.load_artifact``) and serves it through the same batching engine
(``serving.engine.Engine``) and FastAPI application (``serving.openai_api.create_app``: ``/v1/chat/completions``,
``/v1/models``, ``/health``) as ``finetune-pipeline serve`` does for a registered version, on 127.0.0.1 with uvicorn.
So the load test measures the artifact behind the server users run, concurrent requests batched.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

SERVER = "finetune-pipeline serve's engine and OpenAI routes (FastAPI + uvicorn, concurrent requests batched)"


def build_app(fmt: str, path: Path, batch_size: int = 8) -> Any:
    """The OpenAI-compatible app for one artifact; its model id is ``release-<format>``."""
    from finetune_pipeline.release.score import load_artifact
    from finetune_pipeline.serving.engine import Engine, ModelBundle
    from finetune_pipeline.serving.openai_api import create_app

    model, tok, _, _ = load_artifact(fmt, path)
    bundle = ModelBundle(model.eval(), tok, name=f"release-{fmt}", version=fmt)
    return create_app(Engine(bundle, batch_size=batch_size))


def main() -> None:  # pragma: no cover - exercised through the load test's subprocess
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m finetune_pipeline.release.artifact_server")
    ap.add_argument("--format", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args()
    uvicorn.run(build_app(a.format, Path(a.path), a.batch_size), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
