"""Turn a trained adapter into a standalone model, and check that a reloaded copy computes the same logits."""

from __future__ import annotations

from typing import Any

from finetune_pipeline.spec import ModelSpec

PROBE_TEXT = "Check the round trip: the reloaded model must give the same logits."


def standalone_model(base_path: str, model: ModelSpec, tuned_path: str) -> tuple[Any, Any]:
    """(model, tokenizer) with the adapter merged into float32 base weights (QLoRA and bf16 training merge
    into an unquantised float32 copy of the base), or the fully fine-tuned model itself."""
    from transformers import AutoModelForCausalLM

    from finetune_pipeline.models.base import load_tokenizer, torch_dtype

    tok = load_tokenizer(tuned_path, model.trust_remote_code)  # with the chat template the adapter was trained with
    dtype = torch_dtype("float32")
    if model.method == "full":
        m = AutoModelForCausalLM.from_pretrained(tuned_path, dtype=dtype, use_safetensors=True)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=dtype, use_safetensors=True, trust_remote_code=model.trust_remote_code
        )
        m = PeftModel.from_pretrained(base, tuned_path).merge_and_unload()
    # generation stops at the EOS token the template ends answers with, in the registry as in training
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    return m.eval(), tok


def tuned_model(base_path: str, model: ModelSpec, tuned_path: str) -> Any:
    """The trained weights as trained: base + adapter, unmerged, in float32 (the round-trip reference)."""
    from finetune_pipeline.models.base import load_for_eval

    fp32 = model.model_copy(update={"dtype": "float32", "method": "lora" if model.method == "qlora" else model.method})
    if model.method == "full":
        return load_for_eval(tuned_path, fp32, None)[0]
    return load_for_eval(base_path, fp32, tuned_path)[0]


def max_logit_diff(a: Any, b: Any, tok: Any, text: str = PROBE_TEXT) -> float:
    """Largest absolute difference between two models' logits on the same input."""
    import torch

    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        la = a(**{k: v.to(next(a.parameters()).device) for k, v in ids.items()}).logits.float().cpu()
        lb = b(**{k: v.to(next(b.parameters()).device) for k, v in ids.items()}).logits.float().cpu()
    return float((la - lb).abs().max())
