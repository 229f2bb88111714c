"""The serving engine: a registered chat model, generation through the function evaluation uses
(models/chat_generation.py, same chat template), and a small batching queue.

Requests that arrive within ``batch_window_ms`` of each other and ask for compatible generation settings (greedy
with the same max_tokens; or the same sampling settings and seed) are generated together in one left-padded batch,
as evaluation batches its test rows. torch and transformers are imported inside functions.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict[str, str]


class ClientError(ValueError):
    """A request the engine refuses (answered 400); ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys may share a batch (greedy ignores top_p and seed)."""
        if self.temperature <= 0:
            return (self.max_tokens, 0.0)
        return (self.max_tokens, self.temperature, self.top_p, self.seed)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop sequence) or "length"
    prompt_tokens: int
    completion_tokens: int


Sink = Callable[[str], None]


@dataclass
class _Pending:
    conversation: list[Message]
    params: GenParams
    stop: list[str]
    future: asyncio.Future[Completion]
    sink: Sink | None = None


class BatchStreamer:
    """A transformers streamer for a batch: hands each row's new text to that row's sink as tokens are generated.
    The text is decoded as ``generate_detailed`` decodes it (special tokens skipped, stripped), so the pieces sent
    add up to the final answer; trailing whitespace waits until text follows it."""

    def __init__(self, tok: Any, sinks: list[Sink | None]):
        self.tok = tok
        self.sinks = sinks
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.sent = [""] * len(sinks)
        self.done = [False] * len(sinks)
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for i, t in enumerate(value.reshape(-1).tolist()):
            sink = self.sinks[i]
            if sink is None or self.done[i]:
                continue
            if t == self.tok.eos_token_id:
                self.done[i] = True
                continue
            self.ids[i].append(t)
            text = self.tok.decode(self.ids[i], skip_special_tokens=True).strip()
            if text.startswith(self.sent[i]) and len(text) > len(self.sent[i]) and not text.endswith("\ufffd"):
                sink(text[len(self.sent[i]) :])
                self.sent[i] = text

    def end(self) -> None:
        pass


@dataclass
class ModelBundle:
    """A registered version's weights and tokenizer, with its serving defaults (serving.json)."""

    model: Any
    tok: Any
    name: str
    version: str
    defaults: dict[str, Any] = field(default_factory=dict)


def load_registered_bundle(name: str, alias_or_version: str, tracking_uri: str) -> ModelBundle:
    """Resolve ``name@alias`` (or a version number) in the registry at ``tracking_uri`` and load its weights,
    tokenizer (chat template included) and serving defaults, as the registered pyfunc does."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from transformers import AutoModelForCausalLM, AutoTokenizer

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if alias_or_version.isdigit():
            mv = client.get_model_version(name, alias_or_version)
        else:
            mv = client.get_model_version_by_alias(name, alias_or_version)
    except MlflowException as exc:
        raise SystemExit(
            f"no registered model {name}@{alias_or_version} in {tracking_uri}: {exc.message.splitlines()[0]} "
            "(list versions and aliases in the MLflow UI, or set MLFLOW_TRACKING_URI to the registry that has it)"
        ) from exc
    with tempfile.TemporaryDirectory() as d:
        local = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{name}/{mv.version}",
                dst_path=d,
                tracking_uri=tracking_uri,
                registry_uri=tracking_uri,
            )
        )
        folder = local / "artifacts" / "model"
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
        defaults = json.loads((folder / "serving.json").read_text()) if (folder / "serving.json").exists() else {}
    return ModelBundle(model, tok, name, str(mv.version), defaults)


class Engine:
    """Generation for the API, one batch at a time, with a batching queue in front of it."""

    def __init__(
        self,
        bundle: ModelBundle,
        max_tokens_limit: int = 1024,
        batch_size: int | None = None,
        batch_window_ms: float = 10.0,
        on_completion: Callable[[list[Message], Completion], None] | None = None,
    ):
        self.b = bundle
        self.default_max_tokens = int(bundle.defaults.get("max_new_tokens", 128))
        self.batch_size = int(batch_size or bundle.defaults.get("batch_size", 8))
        self.window = batch_window_ms / 1000.0
        self.context_length = _context_length(bundle.model, bundle.tok)
        self.max_tokens_limit = min(max_tokens_limit, self.context_length)
        self.on_completion = on_completion
        self.batch_sizes: list[int] = []  # every generated batch's size (the health route reports them)
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    # checks before a request is queued
    def check(self, conversation: list[Message], params: GenParams) -> int:
        """The prompt's token count; raises ClientError for what cannot be served."""
        from finetune_pipeline.models.chat_generation import prompt_ids

        if params.max_tokens < 1:
            raise ClientError("max_tokens must be >= 1", "max_tokens")
        if params.max_tokens > self.max_tokens_limit:
            raise ClientError(
                f"max_tokens {params.max_tokens} is over this server's limit of {self.max_tokens_limit}",
                "max_tokens",
            )
        if conversation[-1]["role"] == "assistant":
            raise ClientError(
                "the last message must be the user's (or system's): the model answers it",
                "messages",
            )
        try:
            n = len(prompt_ids(self.b.tok, conversation))
        except Exception as exc:  # the chat template refuses the conversation (e.g. roles out of order)
            raise ClientError(f"the model's chat template refused the messages: {exc}", "messages") from exc
        if n + params.max_tokens > self.context_length:
            raise ClientError(
                f"the prompt has {n} tokens; with max_tokens {params.max_tokens} that is over the model's context "
                f"length of {self.context_length} tokens: shorten the messages or lower max_tokens",
                "messages",
            )
        return n

    def generate(
        self,
        conversations: list[list[Message]],
        params: GenParams,
        stops: list[list[str]],
        sinks: list[Sink | None] | None = None,
    ) -> list[Completion]:
        """One batch through evaluation's generation function; stop sequences cut the answer where they occur.
        ``sinks`` (per row, or None) receive the answer's text piece by piece while it is generated."""
        from finetune_pipeline.models.chat_generation import generate_detailed

        streamer = BatchStreamer(self.b.tok, sinks) if sinks and any(sinks) else None
        with self._lock:
            out = generate_detailed(
                self.b.model,
                self.b.tok,
                conversations,
                params.max_tokens,
                params.temperature,
                len(conversations),
                params.seed,
                params.top_p,
                streamer,
            )
            self.batch_sizes.append(len(conversations))
        done = []
        for g, stop in zip(out, stops, strict=True):
            text, reason, n = (
                g["text"],
                "stop" if g["eos"] else "length",
                g["completion_tokens"],
            )
            cut = [i for i in (text.find(s) for s in stop if s) if i >= 0]
            if cut:
                text = text[: min(cut)].rstrip()
                reason = "stop"  # completion_tokens still counts every token generated
            done.append(Completion(text, reason, g["prompt_tokens"], n))
        return done

    async def submit(
        self,
        conversation: list[Message],
        params: GenParams,
        stop: list[str],
        sink: Sink | None = None,
    ) -> Completion:
        """Queue one request; it is answered with the others of its batch. ``sink`` (called from the generating
        thread) receives the answer's text piece by piece; not with stop sequences, which may cut text already
        generated."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._run())
        fut: asyncio.Future[Completion] = loop.create_future()
        await self._queue.put(_Pending(conversation, params, stop, fut, None if stop else sink))
        result = await fut
        if self.on_completion is not None:
            await asyncio.to_thread(self.on_completion, conversation, result)
        return result

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.window
            while len(batch) < self.batch_size and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            groups: dict[tuple[Any, ...], list[_Pending]] = {}
            for p in batch:
                groups.setdefault(p.params.batch_key(), []).append(p)
            for group in groups.values():
                try:
                    res = await asyncio.to_thread(
                        self.generate,
                        [p.conversation for p in group],
                        group[0].params,
                        [p.stop for p in group],
                        [p.sink for p in group],
                    )
                except Exception as exc:  # a failed batch fails its requests, never the worker
                    for p in group:
                        if not p.future.done():
                            p.future.set_exception(exc)
                    continue
                for p, r in zip(group, res, strict=True):
                    if not p.future.done():
                        p.future.set_result(r)


def _context_length(model: Any, tok: Any) -> int:
    n = getattr(model.config, "max_position_embeddings", None)
    t = getattr(tok, "model_max_length", None)
    known = [int(x) for x in (n, t) if isinstance(x, int) and 0 < x < 10**7]
    return min(known) if known else 2048
