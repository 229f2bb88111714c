"""Tier 3: every documented request shape of the registered pyfunc (models/served_model.py), with 1 and 3 rows,
through `mlflow models serve` on 127.0.0.1: N rows in, N answers out, each equal to evaluation's greedy answer
for that row; shapes the model does not accept get a 400 naming the accepted ones. One server for the module."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from finetune_pipeline_tests.test_promotion import _adapter, _eval_and_register, _world

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, body: object, timeout: float = 120) -> tuple[int, object]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def wait_ready(proc: subprocess.Popen, url: str, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.monotonic() < deadline, f"server did not answer {url} in {seconds} s"
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):  # type: ignore[no-untyped-def]
    """A registered champion served by `mlflow models serve`; evaluation's greedy answers for its test rows (as
    conversations) and for their user texts sent alone as prompts."""
    from finetune_pipeline.evaluation.generate import run_model
    from finetune_pipeline.models.base import load_for_eval
    from finetune_pipeline.models.tiny import talkative_copy

    tmp_path = tmp_path_factory.mktemp("served")
    base = talkative_copy(tiny_model, tmp_path / "talkative")  # answers are visible text, not blanks
    spec, layout, train, tracker, lin = _world(tmp_path, base)
    adapter = _adapter(layout, spec, train, "champ", lr=5e-3)
    out, reg = _eval_and_register(layout, spec, "champ", tracker, lin)
    assert reg.promoted
    test = [json.loads(m) for m in layout.read_split_frames()["test"]["messages"]]
    preds = out.record.scores["tuned"].predictions
    # three test rows whose evaluated answers differ where the model allows it (so the order is checked)
    pick = [i for i, p in enumerate(preds) if p not in preds[:i]][:3]
    pick += [i for i in range(len(preds)) if i not in pick][: 3 - len(pick)]
    rows = [test[i] for i in pick]
    convs = [r[:-1] for r in rows]
    chat_expected = [preds[i] for i in pick]
    prompts = [next(m["content"] for m in r if m["role"] == "user") for r in rows]
    model, tok = load_for_eval(layout.read_base().path, spec.model, adapter.path)
    as_rows = [json.dumps([{"role": "user", "content": p}, {"role": "assistant", "content": ""}]) for p in prompts]
    ev = spec.evaluation
    prompt_expected = {n: run_model(model, tok, as_rows[:n], ev, log=lambda m: None).predictions for n in (1, 3)}
    # different rows get different answers (so order is checked), and none is empty (so equality means something)
    assert all(chat_expected) and len(set(chat_expected)) > 1, preds
    assert all(prompt_expected[3]), prompt_expected

    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracker.target.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{spec.registry.model_name}@champion"),
        *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
    ]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/ping", log_path)
            yield port, convs, prompts, chat_expected, prompt_expected
        finally:
            stop(proc)


def _texts(answer: object) -> list[str]:
    """Answer texts of a response body, in order: strings, or chat completions (one or a list)."""
    preds = answer["predictions"] if isinstance(answer, dict) and "predictions" in answer else answer
    preds = preds if isinstance(preds, list) else [preds]
    return [p["choices"][0]["message"]["content"] if isinstance(p, dict) else p for p in preds]


# (shape, body for n rows given conversations c and prompts p, answered as chat?)
SHAPES = {
    "inputs.prompt": (lambda c, p: {"inputs": {"prompt": p}}, False),
    "inputs.prompt (a string)": (lambda c, p: {"inputs": {"prompt": p[0]}} if len(p) == 1 else None, False),
    "inputs.messages": (lambda c, p: {"inputs": {"messages": c}}, True),
    "dataframe_records prompt": (lambda c, p: {"dataframe_records": [{"prompt": x} for x in p]}, False),
    "dataframe_records messages": (lambda c, p: {"dataframe_records": [{"messages": x} for x in c]}, True),
    "dataframe_split prompt": (
        lambda c, p: {"dataframe_split": {"columns": ["prompt"], "data": [[x] for x in p]}},
        False,
    ),
    "dataframe_split messages": (
        lambda c, p: {"dataframe_split": {"columns": ["messages"], "data": [[x] for x in c]}},
        True,
    ),
    "bare string(s)": (lambda c, p: {"inputs": p[0] if len(p) == 1 else p}, False),
    "messages (OpenAI chat)": (lambda c, p: {"messages": c[0]} if len(c) == 1 else None, True),
}


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_gives_one_answer_per_row_equal_to_evaluation(served, shape: str, n: int) -> None:  # type: ignore[no-untyped-def]
    port, convs, prompts, chat_expected, prompt_expected = served
    make, chat = SHAPES[shape]
    body = make(convs[:n], prompts[:n])
    if body is None:
        pytest.skip(f"{shape} holds one row by definition")
    status, answer = post(port, body)
    assert status == 200, answer
    expected = chat_expected[:n] if chat else prompt_expected[n]
    assert _texts(answer) == expected  # N rows in, N answers out, in order, each equal to evaluation's


def test_params_apply_to_every_row(served) -> None:  # type: ignore[no-untyped-def]
    port, convs, prompts, chat_expected, prompt_expected = served
    status, answer = post(port, {"inputs": {"prompt": prompts}, "params": {"max_new_tokens": 1}})
    assert status == 200
    short = _texts(answer)
    assert len(short) == 3
    for s, full in zip(short, prompt_expected[3], strict=True):
        assert full.startswith(s)  # greedy: one token is the start of the longer answer


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": {"question": ["a", "b"]}},
        {"dataframe_records": [{"text": "a"}]},
        {"inputs": {"prompt": ["a"], "messages": [[{"role": "user", "content": "b"}]]}},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"inputs": {"prompt": [1, 2]}},
        {"inputs": []},
        {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    ],
)
def test_unaccepted_shapes_are_400_naming_the_accepted_ones(served, body: dict) -> None:  # type: ignore[no-untyped-def]
    port = served[0]
    status, answer = post(port, body)
    assert status == 400, answer
    assert "accepted shapes" in answer["message"] and "dataframe_records" in answer["message"]
