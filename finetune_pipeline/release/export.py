"""Export the champion: the adapter merged once in float32 (QLoRA: into the dequantised quantised base, see
``models.merge.dequantised_base``), checked against the adapter's own outputs, then written as safetensors in
bf16 / fp16 and as GGUF f16 / q8_0 with an Ollama Modelfile. torch / transformers inside functions."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetune_pipeline.progress import LogFn
from finetune_pipeline.spec import ModelSpec

SAFETENSORS_DTYPES = {"safetensors_bf16": "bfloat16", "safetensors_fp16": "float16"}
MERGE_TOLERANCE = 5e-3  # max |logit difference| merged vs adapter (QLoRA's 4-bit kernels round in bf16 on CPU)


class Artifact(BaseModel):
    """One exported file or folder."""

    format: str
    path: str
    bytes: int
    sha256: str
    details: dict[str, Any] = Field(default_factory=dict)


class Export(BaseModel):
    artifacts: list[Artifact]
    merge_max_logit_diff: float | None  # merged float32 vs the adapter as evaluated (None: full fine-tuning)
    modelfile: str | None = None


def _digest(path: Path) -> tuple[int, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h, size = hashlib.sha256(), 0
    for f in files:
        h.update(f.name.encode())
        size += f.stat().st_size
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return size, h.hexdigest()[:16]


def artifact(fmt: str, path: Path, **details: Any) -> Artifact:
    size, sha = _digest(path)
    return Artifact(format=fmt, path=str(path), bytes=size, sha256=sha, details=details)


def save_safetensors(model: Any, tok: Any, out: Path, dtype: str) -> Path:
    """The merged model cast to ``dtype`` with its tokenizer and chat template, as a from_pretrained folder."""
    import copy

    import torch

    m = copy.deepcopy(model).to(getattr(torch, dtype))
    m.config.dtype = getattr(torch, dtype)
    out.mkdir(parents=True, exist_ok=True)
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del m
    return out


def merge_check(base_path: str, model: ModelSpec, adapter_path: str, merged: Any, tok: Any) -> float | None:
    """Largest logit difference between the merged float32 model and the adapter on the weights it was
    evaluated with (QLoRA: the 4-bit base through bitsandbytes)."""
    if model.method == "full":
        return None
    from finetune_pipeline.models.base import load_for_eval
    from finetune_pipeline.models.merge import max_logit_diff

    evaluated, _ = load_for_eval(base_path, model, adapter_path)
    diff = max_logit_diff(merged, evaluated, tok)
    del evaluated
    return diff


def export_all(
    base_path: str,
    model: ModelSpec,
    adapter_path: str,
    out: Path,
    formats: list[str],
    title: str,
    max_tokens: int,
    log: LogFn = print,
) -> Export:
    """Every format of ``formats`` under ``out`` (one folder per safetensors dtype, gguf/ for GGUF + Modelfile)."""
    from finetune_pipeline.models.merge import standalone_model
    from finetune_pipeline.release.gguf_export import serving_template, write_gguf
    from finetune_pipeline.release.modelfile import modelfile

    merged, tok = standalone_model(base_path, model, adapter_path)
    diff = merge_check(base_path, model, adapter_path, merged, tok)
    if diff is not None:
        log(f"merged float32 model vs the adapter as evaluated ({model.method}): max |logit diff| {diff:.2e}")
    arts: list[Artifact] = []
    for fmt in formats:
        if fmt in SAFETENSORS_DTYPES:
            path = save_safetensors(merged, tok, out / fmt.replace("_", "-"), SAFETENSORS_DTYPES[fmt])
            arts.append(artifact(fmt, path, dtype=SAFETENSORS_DTYPES[fmt]))
        else:
            path = out / "gguf" / f"model-{fmt.removeprefix('gguf_').replace('_', '')}.gguf"
            info = write_gguf(merged, tok, path, fmt, title)
            arts.append(artifact(fmt, path, **info))
        log(f"{fmt}: {arts[-1].bytes / 1e6:.1f} MB at {arts[-1].path}")
    mf = None
    ggufs = [a for a in arts if a.format.startswith("gguf")]
    if ggufs:
        pick = next((a for a in ggufs if a.format == "gguf_q8_0"), ggufs[0])
        stop = pick.details.get("stop")
        mf = modelfile(tok, serving_template(tok.chat_template or ""), Path(pick.path).name, stop, max_tokens, title)
        (out / "gguf" / "Modelfile").write_text(mf)
    del merged
    return Export(artifacts=arts, merge_max_logit_diff=diff, modelfile=mf)
