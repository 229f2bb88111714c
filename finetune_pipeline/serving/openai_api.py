"""OpenAI-compatible HTTP API over the serving engine (FastAPI; run by uvicorn).

POST /v1/chat/completions (messages, max_tokens / max_completion_tokens, temperature, top_p, seed, stop, stream,
stream_options.include_usage), GET /v1/models, GET /health. Client errors (bad JSON, unknown role, wrong types,
prompt over the context length, max_tokens over the limit, unsupported options) are 400 in OpenAI's error shape
``{"error": {"message", "type", "param", "code"}}``; an unknown model is 404. Omitted ``temperature`` means the
model's evaluated setting (greedy), not OpenAI's default of 1.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

from finetune_pipeline.serving.engine import ClientError, Completion, Engine, GenParams


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {
            "role": "system" if self.role == "developer" else self.role,
            "content": text,
        }


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat completion request this server honours; other known fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1

    def stops(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(s) > 4:
            raise ClientError("stop takes at most 4 sequences", "stop")
        return s


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> Any:
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _usage(c: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
    }


def create_app(engine: Engine) -> Any:
    """The FastAPI application serving ``engine``'s model under OpenAI's routes."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse

    b = engine.b
    model_id = b.name
    aliases = {
        model_id,
        f"{b.name}/{b.version}",
        *(f"{b.name}@{a}" for a in b.defaults.get("aliases", [])),
    }
    app = FastAPI(
        title=f"finetune-pipeline serve {model_id} v{b.version}",
        docs_url=None,
        redoc_url=None,
    )
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Any:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc or 'body'}: {e.get('msg')}")
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
        return _error(400, "invalid request: " + "; ".join(parts), param)

    @app.exception_handler(ClientError)
    async def _client(request: Request, exc: ClientError) -> Any:
        return _error(400, str(exc), exc.param)

    @app.exception_handler(Exception)
    async def _server(request: Request, exc: Exception) -> Any:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        sizes = engine.batch_sizes
        return {
            "status": "ok",
            "model": model_id,
            "version": b.version,
            "batches": len(sizes),
            "requests": sum(sizes),
            "largest_batch": max(sizes, default=0),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": created,
                    "owned_by": "finetune-pipeline",
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        if req.model is not None and req.model not in aliases:
            return _error(
                404,
                f"model '{req.model}' is not served here; this server serves '{model_id}'",
                "model",
                "model_not_found",
            )
        if req.n != 1:
            raise ClientError("n must be 1 (one answer per request)", "n")
        conv = [m.as_message() for m in req.messages]
        max_tokens = (
            req.max_completion_tokens or req.max_tokens or min(engine.default_max_tokens, engine.max_tokens_limit)
        )
        temperature = float(req.temperature) if req.temperature is not None else float(b.defaults.get("temperature", 0))
        params = GenParams(int(max_tokens), temperature, float(req.top_p), int(req.seed or 0))
        stop = req.stops()
        engine.check(conv, params)
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(
                    engine,
                    conv,
                    params,
                    stop,
                    Chunks(cid, now, model_id),
                    include_usage,
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        result = await engine.submit(conv, params, stop)
        return {
            "id": cid,
            "object": "chat.completion",
            "created": now,
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": _usage(result),
        }

    return app


def _pieces(tok: Any, text: str) -> list[str]:
    """The answer cut at token boundaries (each piece the text one more token adds)."""
    ids = tok.encode(text, add_special_tokens=False)
    out, prev = [], ""
    for i in range(1, len(ids) + 1):
        cur = tok.decode(ids[:i], skip_special_tokens=True)
        if cur.startswith(prev) and len(cur) > len(prev) and not cur.endswith("\ufffd"):
            out.append(cur[len(prev) :])
            prev = cur
    if not text.startswith(prev):  # decoding piecewise did not reproduce the answer: send it whole
        return [text] if text else []
    if prev != text:
        out.append(text[len(prev) :])
    return out


class Chunks:
    """OpenAI's ``chat.completion.chunk`` events of one response."""

    def __init__(self, cid: str, created: int, model: str):
        self.base = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
        }

    def event(self, delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return f"data: {json.dumps({**self.base, 'choices': choices, **extra})}\n\n".encode()


async def _sse(
    engine: Engine,
    conv: list[dict[str, str]],
    params: GenParams,
    stop: list[str],
    c: Chunks,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The role, then the answer piece by piece as it is generated (with stop sequences: once generated, as they
    may cut text already generated), the finish reason, optionally the usage, then ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.ensure_future(
        engine.submit(
            conv,
            params,
            stop,
            lambda p: loop.call_soon_threadsafe(pieces.put_nowait, p),
        )
    )
    yield c.event({"role": "assistant", "content": ""})
    sent = ""
    while not task.done() or not pieces.empty():
        getter = asyncio.ensure_future(pieces.get())
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        sent += getter.result()
        yield c.event({"content": getter.result()})
    try:
        result = task.result()
    except Exception as exc:  # the batch failed after the stream began: say so in OpenAI's error shape
        err = {
            "message": f"generation failed: {type(exc).__name__}: {exc}",
            "type": "server_error",
        }
        yield f"data: {json.dumps({'error': err})}\n\n".encode()
        yield b"data: [DONE]\n\n"
        return
    rest = result.text[len(sent) :] if result.text.startswith(sent) else ""
    for piece in _pieces(engine.b.tok, rest) if not sent else ([rest] if rest else []):
        yield c.event({"content": piece})
    yield c.event({}, result.finish_reason)
    if include_usage:
        yield c.event(None, usage=_usage(result))
    yield b"data: [DONE]\n\n"
