"""Tier 3: `finetune-pipeline serve NAME` (serving/server.py) started as a real process on a registered champion in a
temporary MLflow store, queried with the official `openai` client: answers equal evaluation's greedy answers for the
test rows, a stream, the model list and health route; with serving.log_requests the exchanges land in the review
folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from finetune_pipeline_tests.test_promotion import SPEC, _adapter, _eval_and_register, _world
from finetune_pipeline_tests.test_served_model import free_port, stop, wait_ready

pytestmark = pytest.mark.e2e


def test_parse_ref_defaults_to_champion() -> None:
    from finetune_pipeline.serving.server import parse_ref

    assert parse_ref("m") == ("m", "champion")
    assert parse_ref("m@challenger") == ("m", "challenger")
    assert parse_ref("models:/m/3") == ("m", "3")
    with pytest.raises(SystemExit, match="NAME@ALIAS"):
        parse_ref("m@")


def test_serve_cli_answers_an_openai_client_like_the_evaluation(tmp_path: Path, tiny_model: Path) -> None:
    from openai import OpenAI

    from finetune_pipeline.layout import PipelineLayout
    from finetune_pipeline.models.tiny import talkative_copy

    base = talkative_copy(tiny_model, tmp_path / "talkative")
    spec, layout, train, tracker, lin = _world(tmp_path, base)
    _adapter(layout, spec, train, "champ", lr=5e-3)
    out, reg = _eval_and_register(layout, spec, "champ", tracker, lin)
    assert reg.promoted
    rows = [json.loads(m) for m in layout.read_split_frames()["test"]["messages"][:2]]
    expected = out.record.scores["tuned"].predictions[:2]
    assert all(expected), expected
    spec_file = tmp_path / "specs" / "prom.yaml"
    spec_file.parent.mkdir()
    spec_file.write_text(SPEC.format(model=base, seed=0, forgetting="false") + "serving: {log_requests: true}\n")

    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracker.target.tracking_uri,
        "FINETUNE_HOME": str(tmp_path / "state"),
        "FINETUNE_SPECS": str(spec_file.parent),
    }
    cmd = [sys.executable, "-m", "finetune_pipeline.cli", "serve", "prom-model", "--port", str(port)]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/health", log_path)
            client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
            assert [m.id for m in client.models.list().data] == ["prom-model"]
            got = [
                client.chat.completions.create(model="prom-model", messages=r[:-1]).choices[0].message.content
                for r in rows
            ]
            assert got == expected  # served = evaluated, row by row
            stream = client.chat.completions.create(model="prom-model@champion", messages=rows[0][:-1], stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected[0]
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            assert health["version"] == reg.version and health["requests"] == 3
        finally:
            stop(proc)
    text = log_path.read_text()
    assert "serving prom-model v1 (prom-model@champion)" in text and "127.0.0.1" in text
    review = PipelineLayout(tmp_path / "state", "prom").review
    logged = [json.loads(line) for f in review.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in logged] == [*expected, expected[0]]
