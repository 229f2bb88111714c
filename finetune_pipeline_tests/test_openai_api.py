"""Tier 2: the OpenAI-compatible API (serving/openai_api.py + engine.py) on 127.0.0.1, queried with the official
`openai` client: answers equal evaluation's greedy generation for the same rows, streaming, usage and finish reasons,
stop sequences, batching of concurrent requests, and client errors as 400 in OpenAI's error shape."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

MAX_NEW = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The FastAPI app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start in 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def rows(n: int, start: int = 200) -> list[list[dict[str, str]]]:
    """Conversations as evaluation sees them (the test row without its answer), of equal token length."""
    from finetune_pipeline_tests.conftest import chat_row

    return [chat_row(i)["messages"][:-1] for i in range(start, start + n)]


def evaluation_answers(model, tok, convs, max_new: int = MAX_NEW) -> list[str]:  # type: ignore[no-untyped-def]
    """What evaluation's greedy generation gives for these rows (evaluation/generate.py::run_model)."""
    from finetune_pipeline.evaluation.generate import run_model
    from finetune_pipeline.spec import EvaluationSpec

    msgs = [json.dumps([*c, {"role": "assistant", "content": ""}]) for c in convs]
    spec = EvaluationSpec(max_new_tokens=max_new, batch_size=8)
    return run_model(model, tok, msgs, spec, log=lambda m: None).predictions


@pytest.fixture(scope="module")
def talkative(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model answering with visible text (not blanks that decode to ""), so comparisons compare something."""
    from finetune_pipeline.models.tiny import talkative_copy

    return talkative_copy(tiny_model, tmp_path_factory.mktemp("talkative") / "model")


@pytest.fixture(scope="module")
def bundle(talkative: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_pipeline.serving.engine import ModelBundle

    tok = AutoTokenizer.from_pretrained(talkative)
    model = AutoModelForCausalLM.from_pretrained(talkative, use_safetensors=True).eval()
    defaults = {"max_new_tokens": MAX_NEW, "batch_size": 8, "temperature": 0.0, "aliases": ["champion"]}
    return ModelBundle(model, tok, "tiny-chat", "1", defaults)


@pytest.fixture(scope="module")
def live(bundle):  # type: ignore[no-untyped-def]
    from finetune_pipeline.serving.engine import Engine
    from finetune_pipeline.serving.openai_api import create_app

    engine = Engine(bundle, max_tokens_limit=64, batch_window_ms=300)
    with LiveServer(create_app(engine)) as srv:
        yield srv, engine


@pytest.fixture(scope="module")
def client(live):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{live[0].base}/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_equals_evaluation_with_usage(client, bundle) -> None:  # type: ignore[no-untyped-def]
    from finetune_pipeline.models.chat_generation import prompt_ids

    conv = rows(1)[0]
    r = client.chat.completions.create(model="tiny-chat", messages=conv)
    expected = evaluation_answers(bundle.model, bundle.tok, [conv])[0]
    assert expected and r.choices[0].message.content == expected
    assert r.choices[0].message.role == "assistant" and r.model == "tiny-chat"
    assert r.usage.prompt_tokens == len(prompt_ids(bundle.tok, conv))
    assert 1 <= r.usage.completion_tokens <= MAX_NEW
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # "length" exactly when the answer used every token without reaching EOS
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == MAX_NEW else "stop")
    short = client.chat.completions.create(model="tiny-chat@champion", messages=conv, max_tokens=1)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason in ("length", "stop")
    assert r.choices[0].message.content.startswith(short.choices[0].message.content)


def test_stream_is_openai_chunks_ending_with_done(client, live) -> None:  # type: ignore[no-untyped-def]
    conv = rows(1, start=205)[0]
    full = client.chat.completions.create(model="tiny-chat", messages=conv)
    chunks = list(
        client.chat.completions.create(
            model="tiny-chat", messages=conv, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == full.usage.total_tokens
    raw = httpx.post(f"{live[0].base}/v1/chat/completions", json={"messages": conv, "stream": True}, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_four_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, live, bundle) -> None:  # type: ignore[no-untyped-def]
    engine = live[1]
    convs = rows(4, start=300)
    expected = evaluation_answers(bundle.model, bundle.tok, convs)
    before = len(engine.batch_sizes)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda c: client.chat.completions.create(model="tiny-chat", messages=c), convs))
    assert len(set(expected)) > 1  # different rows, different answers: the order is checked
    assert [g.choices[0].message.content for g in got] == expected
    new = engine.batch_sizes[before:]
    assert sum(new) == 4 and max(new) >= 2, new  # generated together, not one by one
    health = httpx.get(f"{live[0].base}/health").json()
    assert health["status"] == "ok" and health["largest_batch"] >= 2


def test_stop_sequence_cuts_the_answer(client, bundle) -> None:  # type: ignore[no-untyped-def]
    conv = rows(1, start=210)[0]
    full = client.chat.completions.create(model="tiny-chat", messages=conv, max_tokens=12).choices[0]
    text = full.message.content
    assert len(text) >= 2, text
    stop = text[len(text) // 2 :][:3]
    cut = client.chat.completions.create(model="tiny-chat", messages=conv, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == text[: text.find(stop)].rstrip()
    assert cut.finish_reason == "stop"


def test_sampling_with_a_seed_repeats(client) -> None:  # type: ignore[no-untyped-def]
    conv = rows(1, start=220)[0]
    kw = {"model": "tiny-chat", "messages": conv, "temperature": 1.0, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_models_route(client) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ('{"messages": [', "JSON"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "word " * 1500}]}, "context length"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 65}, "limit of 64"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "content"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n must be 1"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "last message"),
    ],
)
def test_client_errors_are_400_in_openai_shape(live, body, needle: str) -> None:  # type: ignore[no-untyped-def]
    url = f"{live[0].base}/v1/chat/completions"
    if isinstance(body, str):
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and needle.lower() in err["message"].lower(), err


def test_openai_client_sees_bad_requests_and_unknown_models(client) -> None:  # type: ignore[no-untyped-def]
    import openai

    with pytest.raises(openai.BadRequestError, match="limit"):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=999)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_batch_streamer_pieces_add_up_to_each_rows_answer(bundle) -> None:  # type: ignore[no-untyped-def]
    """Streaming sees the batch's tokens as they are generated: each row's pieces arrive one by one and add up to
    exactly that row's final answer (the one evaluation's decoding gives)."""
    from finetune_pipeline.models.chat_generation import generate_detailed
    from finetune_pipeline.serving.engine import BatchStreamer

    convs = rows(3, start=400)
    got: list[list[str]] = [[], [], []]
    streamer = BatchStreamer(bundle.tok, [got[0].append, None, got[2].append])
    out = generate_detailed(bundle.model, bundle.tok, convs, 10, streamer=streamer)
    assert "".join(got[0]) == out[0]["text"] and "".join(got[2]) == out[2]["text"]
    assert len(got[0]) > 1 and got[1] == []  # several pieces; a row without a sink gets none
    assert [g["text"] for g in out] == evaluation_answers(bundle.model, bundle.tok, convs, 10)
