"""base_model: the spec's model.base as something every later step can load offline."""

from __future__ import annotations

from dataclasses import dataclass

from finetune_pipeline.layout import BaseModelRecord, PipelineLayout
from finetune_pipeline.spec import LoadedSpec


@dataclass
class BaseOutcome:
    record: BaseModelRecord
    converted_now: bool
    seconds: float


def provision_base(layout: PipelineLayout, spec: LoadedSpec) -> BaseOutcome:
    """A packaged model is converted once to safetensors; a local folder (relative to the spec file) is used as
    is; a hub id is passed through, with its tokenizer saved once under the state root for token counts."""
    from finetune_pipeline.models.base import PACKAGED, provision_base_model, save_hub_tokenizer

    m = spec.model
    base = m.base
    if base not in PACKAGED and (base.startswith((".", "/", "~")) or spec.resolve(base).exists()):
        base = str(spec.resolve(base))  # a local folder, relative to the spec file
    pm = provision_base_model(base, m.trust_remote_code, target_root=layout.state.models)
    tok_dir = pm.path
    if pm.kind == "hub":
        tok_dir = str(save_hub_tokenizer(base, layout.state.tokenizers, m.trust_remote_code))
    rec = BaseModelRecord(path=pm.path, kind=pm.kind, digest=pm.digest, source=m.base, tokenizer_dir=tok_dir)
    rec.save(layout.base_model)
    return BaseOutcome(rec, pm.converted, pm.seconds)
