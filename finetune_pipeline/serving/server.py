"""`finetune-pipeline serve NAME[@ALIAS]`: load a registered version, find the spec that registers it (for
``serving.log_requests`` and ``cleaning.pii``), and run the OpenAI-compatible API under uvicorn."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from finetune_pipeline.layout import PipelineLayout, StateLayout
from finetune_pipeline.paths import specs_dir, state_root
from finetune_pipeline.serving.engine import Engine, load_registered_bundle
from finetune_pipeline.serving.feedback import RequestLog
from finetune_pipeline.spec import LoadedSpec

DEFAULT_ALIAS = "champion"


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME@ALIAS`` / ``NAME/VERSION`` / ``NAME`` (alias champion) -> (name, alias or version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
    elif "/" in ref:
        name, alias = ref.rsplit("/", 1)
    else:
        name, alias = ref, DEFAULT_ALIAS
    if not name or not alias:
        raise SystemExit(f"'{ref}': give NAME, NAME@ALIAS or NAME/VERSION (e.g. ticket-triage-smollm2@champion)")
    return name, alias


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the state root's SQLite registry (the one the pipeline registers into)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{StateLayout(state_root()).mlflow_db}"


def spec_for(model_name: str, spec_path: Path | None = None) -> LoadedSpec | None:
    """The spec whose registry.model_name is ``model_name`` (``spec_path`` if given), or None."""
    from finetune_pipeline.spec import load_spec, load_specs_report

    if spec_path is not None:
        return load_spec(spec_path)
    folder = specs_dir()
    specs = load_specs_report(folder)[0] if folder.is_dir() else []
    found = [s for s in specs if s.spec.registry.model_name == model_name]
    return found[0] if found else None


def build(
    ref: str,
    max_tokens_limit: int = 1024,
    batch_window_ms: float = 10.0,
    batch_size: int | None = None,
    spec_path: Path | None = None,
    log: Any = print,
) -> tuple[Engine, RequestLog | None]:
    """The engine for ``ref`` and, when its spec turns serving.log_requests on, the request log it feeds."""
    name, alias = parse_ref(ref)
    uri = tracking_uri()
    bundle = load_registered_bundle(name, alias, uri)
    bundle.defaults.setdefault("aliases", [alias] if not alias.isdigit() else [])
    spec = spec_for(name, spec_path)
    request_log = None
    if spec is not None and spec.spec.serving.log_requests:
        folder = PipelineLayout(state_root(), spec.name).review
        request_log = RequestLog(folder, name, bundle.version, spec.cleaning.pii)
        log(f"serving.log_requests is on ({spec.path}): requests and answers go, masked, to {folder}")
    engine = Engine(
        bundle,
        max_tokens_limit=max_tokens_limit,
        batch_size=batch_size,
        batch_window_ms=batch_window_ms,
        on_completion=(lambda conv, c: request_log.append(conv, c.text)) if request_log else None,
    )
    log(
        f"serving {name} v{bundle.version} ({name}@{alias}) from {uri}: context {engine.context_length} tokens, "
        f"max_tokens <= {engine.max_tokens_limit} (default {engine.default_max_tokens}), batches of up to "
        f"{engine.batch_size} within {batch_window_ms:g} ms"
    )
    return engine, request_log


def serve(ref: str, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
    import uvicorn

    from finetune_pipeline.serving.openai_api import create_app

    engine, _ = build(ref, **kw)
    print(f"OpenAI-compatible API on http://{host}:{port}/v1 (POST /v1/chat/completions, GET /v1/models, GET /health)")
    sys.stdout.flush()
    uvicorn.run(create_app(engine), host=host, port=port, log_level="info")
