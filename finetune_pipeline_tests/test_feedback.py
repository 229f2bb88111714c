"""Tier 2: the feedback drop (serving.log_requests, serving/feedback.py). Requests answered by the API are appended,
masked with cleaning.pii, as chat-format JSONL to the review folder outside incoming_dir; moved into incoming_dir,
the file is registered, stored and cleaned by the ingest like any other drop."""

import json
import shutil
from pathlib import Path

import pytest

from finetune_pipeline_tests.test_openai_api import LiveServer

pytestmark = pytest.mark.integration

SPEC = """
name: fb
source: {{incoming_dir: in, settle_seconds: 0}}
model: {{base: {model}}}
cleaning: {{pii: {{mode: report, kinds: [email, phone], phone_region: GB}}}}
registry: {{model_name: fb-model}}
serving: {{log_requests: true}}
"""


def test_log_requests_is_off_by_default() -> None:
    from finetune_pipeline_tests.conftest import make_spec

    assert make_spec().serving.log_requests is False


def test_served_requests_become_a_valid_drop(tmp_path: Path, tiny_model: Path) -> None:
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_pipeline.layout import PipelineLayout
    from finetune_pipeline.models.tiny import talkative_copy
    from finetune_pipeline.serving.engine import Engine, ModelBundle
    from finetune_pipeline.serving.feedback import RequestLog
    from finetune_pipeline.serving.openai_api import create_app
    from finetune_pipeline.spec import parse_spec
    from finetune_pipeline.stages.ingest import ingest_drop, scan_sources, store_raw

    base = talkative_copy(tiny_model, tmp_path / "model")
    spec = parse_spec(SPEC.format(model=base), path=tmp_path / "fb.yaml")
    layout = PipelineLayout(tmp_path / "state", spec.name)
    log = RequestLog(layout.review, "fb-model", "3", spec.cleaning.pii)
    tok = AutoTokenizer.from_pretrained(base)
    bundle = ModelBundle(AutoModelForCausalLM.from_pretrained(base).eval(), tok, "fb-model", "3", {"max_new_tokens": 8})
    engine = Engine(bundle, on_completion=lambda conv, c: log.append(conv, c.text))
    questions = [
        "Reach me at jane.doe@example.com about invoice 7",
        "Call +44 20 7946 0958 before noon, my export fails",
        "Why does the sync stop at 99 percent?",
    ]
    answers = []
    with LiveServer(create_app(engine)) as srv:
        client = OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0, timeout=60)
        for q in questions:
            msgs = [{"role": "system", "content": "Support bot."}, {"role": "user", "content": q}]
            answers.append(client.chat.completions.create(model="fb-model", messages=msgs).choices[0].message.content)

    files = list(layout.review.glob("*.jsonl"))
    assert [f.name for f in files] == [log.path().name] and files[0].name.startswith("fb-model-v3-")
    assert not files[0].resolve().is_relative_to(spec.incoming_dir.resolve())  # never straight into incoming_dir
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["messages"][-1] for r in rows] == [{"role": "assistant", "content": a} for a in answers]
    text = files[0].read_text()
    assert "jane.doe@example.com" not in text and "[EMAIL]" in text
    assert "7946" not in text and "[PHONE]" in text
    assert rows[2]["messages"][1]["content"] == questions[2]  # nothing to mask: unchanged

    # the reviewer moves the file into incoming_dir: an ordinary drop
    spec.incoming_dir.mkdir(parents=True)
    dropped = Path(shutil.move(str(files[0]), spec.incoming_dir / files[0].name))
    first = scan_sources(spec, {}, set())
    scan = scan_sources(spec, first.seen, set())
    ready = first.ready or scan.ready
    assert [d.path.name for d in ready] == [dropped.name]
    store_raw(layout, spec, ready[0].key, str(dropped))
    rec = ingest_drop(layout, spec, ready[0].key, log=lambda m: None)
    assert rec.result.record_format == "chat" and rec.result.rows_in == 3
    assert rec.used_for_training and len(rec.result.kept) == 3 and not rec.schema_problems
