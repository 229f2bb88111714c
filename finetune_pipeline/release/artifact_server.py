"""A minimal OpenAI-style chat endpoint for one exported artifact, for the release's loopback load test.

``python -m finetune_pipeline.release.artifact_server --format gguf_q8_0 --path model.gguf --port 8765`` serves
``POST /v1/chat/completions`` (messages, max_tokens, temperature, seed) and ``GET /health`` on 127.0.0.1 with
FastAPI + uvicorn. Generation goes through the evaluation's function (``models.chat_generation``); one request
generates at a time (no batching): it measures the artifact, not a production server.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    """Module level: FastAPI resolves the body's annotation by name (this module uses postponed annotations)."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(64, gt=0, le=4096)
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0


def build_app(fmt: str, path: Path) -> Any:
    from fastapi import FastAPI, HTTPException

    from finetune_pipeline.models.chat_generation import generate_answers
    from finetune_pipeline.release.score import load_artifact

    model, tok, loader, _ = load_artifact(fmt, path)
    lock = threading.Lock()
    app = FastAPI(title=f"release artifact {fmt}")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "format": fmt, "loader": loader}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict[str, Any]:
        msgs = [m.model_dump() for m in req.messages]
        if any(m["role"] not in ("system", "user", "assistant") for m in msgs):
            raise HTTPException(400, "roles must be system, user or assistant")
        with lock:
            answers, eos = generate_answers(model, tok, [msgs], req.max_tokens, req.temperature, 1, req.seed)
        n_out = len(tok.encode(answers[0], add_special_tokens=False)) + int(eos[0])
        return {
            "object": "chat.completion",
            "created": int(time.time()),
            "model": fmt,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answers[0]},
                    "finish_reason": "stop" if eos[0] else "length",
                }
            ],
            "usage": {"completion_tokens": n_out},
        }

    return app


def main() -> None:  # pragma: no cover - exercised through the load test's subprocess
    import uvicorn

    ap = argparse.ArgumentParser(prog="python -m finetune_pipeline.release.artifact_server")
    ap.add_argument("--format", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvicorn.run(build_app(a.format, Path(a.path)), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
