"""Tier 2/3: the registered champion served by `mlflow models serve` answers like the evaluation did; manual
promote/rollback keep a history and never touch an unverified version."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from finetune_pipeline.tracking import mlflow_store
from finetune_pipeline_tests.test_promotion import _adapter, _eval_and_register, _record, _world

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(port: int, body: dict, timeout: float = 120) -> object:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def test_served_champion_answers_like_the_evaluation(tmp_path: Path, tiny_model: Path) -> None:
    spec, layout, train, target, lin = _world(tmp_path, tiny_model)
    _adapter(layout, spec, train, "champ", lr=5e-3)
    out, reg = _eval_and_register(layout, spec, "champ", target, lin)
    assert reg.promoted
    frames = layout.read_split_frames()
    row = json.loads(frames["test"]["messages"][0])
    expected = out.record.scores["tuned"].predictions[0]

    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": target.tracking_uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        *(sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{spec.spec.registry.model_name}@champion"),
        *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
    ]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "server did not start in 180 s"
                time.sleep(1)
        chat = _post(port, {"messages": row[:-1]})
        assert chat["choices"][0]["message"]["content"] == expected  # served = evaluated (greedy)
        prompt = next(m["content"] for m in row if m["role"] == "user")
        texts = _post(port, {"inputs": {"prompt": [prompt]}, "params": {"max_new_tokens": 2}})
        assert isinstance(texts["predictions"][0], str)
        short = _post(port, {"messages": row[:-1], "max_new_tokens": 1})
        assert len(short["choices"][0]["message"]["content"]) <= len(chat["choices"][0]["message"]["content"])
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def test_promote_rollback_history_and_unverified_versions(tmp_path: Path, tiny_model: Path) -> None:
    from mlflow import MlflowClient

    from finetune_pipeline.stages.register import AliasRefused, promote_version, register, rollback

    spec, layout, train, target, lin = _world(tmp_path, tiny_model)
    _adapter(layout, spec, train, "champ", lr=5e-3)
    _, first = _eval_and_register(layout, spec, "champ", target, lin)
    shutil.copytree(layout.adapter("champ"), layout.adapter("copy"))
    _record(layout, spec, "copy", layout.adapter("copy"))
    out, second = _eval_and_register(layout, spec, "copy", target, lin)
    name = spec.spec.registry.model_name
    client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
    assert not second.promoted and second.aliases == ["challenger"]

    prev = promote_version(name, second.version, "ops decision")
    assert prev == first.version
    assert str(client.get_model_version_by_alias(name, "champion").version) == second.version
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == first.version
    assert rollback(name, "bad answers in production") == (second.version, first.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    history = mlflow_store.champion_history(name)
    assert [h["version"] for h in history] == [first.version, second.version, first.version]
    assert "rollback from v2: bad answers in production" in history[-1]["reason"]

    # a version whose registry copy does not reproduce the trained logits loses its aliases and cannot be promoted
    client.set_model_version_tag(name, second.version, mlflow_store.RELOAD_TAG, "1.0")
    again = register(layout, spec, out.record.eval_key, target, lin, log=lambda m: None)
    assert again.aliases == [] and "reload check failed" in again.reason
    aliases = dict(client.get_registered_model(name).aliases)
    assert second.version not in {str(aliases.get(a)) for a in ("challenger", "champion")}
    with pytest.raises(AliasRefused, match="reload_same_logits"):
        promote_version(name, second.version, "try")
