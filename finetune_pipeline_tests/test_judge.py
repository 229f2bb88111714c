"""The optional LLM judge: position swap rules (tier 1), a local judge model, and an OpenAI-compatible endpoint
given by environment variables (a stub server on 127.0.0.1)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from finetune_pipeline.evaluation.judge import endpoint_judge, judge_pairs, local_judge
from finetune_pipeline.spec import JudgeSpec

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (lambda q: "A", "tie"),
        (lambda q: "A" if "Answer A:\ngood" in q else "B", "win"),
        (lambda q: "A" if "Answer A:\nbad" in q else "B", "loss"),
    ],
    ids=["position-bias-is-a-tie", "content-win", "content-loss"],
)
def test_position_swap_rules(answer, verdict) -> None:  # type: ignore[no-untyped-def]
    out = judge_pairs(answer, ["q"], ["r"], ["good"], ["bad"], "base")
    assert out["rows"][0]["verdict"] == verdict and out[verdict] == 1


def test_local_judge_model(tiny_model: Path) -> None:
    out = judge_pairs(local_judge(str(tiny_model)), ["q1", "q2"], ["r", "r"], ["x", "y"], ["z", "w"], "base")
    assert out["win"] + out["tie"] + out["loss"] == 2
    assert all(r["first"] in "AB" and r["swapped"] in "AB" for r in out["rows"])


def test_endpoint_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"auth": self.headers.get("Authorization"), "path": self.path, "body": body})
            reply = {"choices": [{"message": {"content": "B"}}]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a) -> None:  # type: ignore[no-untyped-def]
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("FINETUNE_JUDGE_URL", f"http://127.0.0.1:{server.server_address[1]}/v1")
        monkeypatch.setenv("FINETUNE_JUDGE_API_KEY", "secret")
        out = judge_pairs(endpoint_judge(JudgeSpec(enabled=True)), ["q"], ["r"], ["a"], ["b"], "base")
    finally:
        server.shutdown()
    assert out["tie"] == 1  # always "B": position-dependent
    assert seen[0]["auth"] == "Bearer secret" and seen[0]["path"] == "/v1/chat/completions" and len(seen) == 2
    monkeypatch.delenv("FINETUNE_JUDGE_URL")
    with pytest.raises(ValueError, match="FINETUNE_JUDGE_URL"):
        endpoint_judge(JudgeSpec(enabled=True))
