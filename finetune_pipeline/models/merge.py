"""Turn a trained adapter into a standalone model, and check that a reloaded copy computes the same logits."""

from __future__ import annotations

from typing import Any

from finetune_pipeline.spec import ModelSpec

PROBE_TEXT = "Check the round trip: the reloaded model must give the same logits."


def dequantised_base(base_path: str, model: ModelSpec) -> Any:
    """The base weights the adapter was trained on, in float32: for QLoRA the bitsandbytes-quantised base
    (nf4 / int8, as training and evaluation loaded it) dequantised, never the unquantised weights it was made
    from (an adapter learnt on top of the quantisation error belongs on the quantised weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.float32, "use_safetensors": True, "trust_remote_code": model.trust_remote_code}
    base = AutoModelForCausalLM.from_pretrained(base_path, **kw)
    if model.method != "qlora":
        return base
    from peft.utils.integrations import dequantize_bnb_weight, get_bnb_param_type

    from finetune_pipeline.models.base import quantization_config

    quantised = AutoModelForCausalLM.from_pretrained(base_path, quantization_config=quantization_config(model), **kw)
    linears = dict(base.named_modules())
    with torch.no_grad():
        for name, mod in quantised.named_modules():
            w = getattr(mod, "weight", None)
            kind = get_bnb_param_type(w) if w is not None else False
            if not kind:
                continue
            qs = getattr(w, "quant_state", None)
            if kind == "4bit" and getattr(qs, "packing_format_for_cpu", False):
                # bitsandbytes repacks 4-bit weights for its CPU kernel at the first forward; undo it first
                from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

                w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, qs)
            deq = dequantize_bnb_weight(w, state=qs if kind == "4bit" else getattr(mod, "state", None))
            linears[name].weight.copy_(deq.to(torch.float32).reshape(linears[name].weight.shape))
    del quantised
    return base


def standalone_model(base_path: str, model: ModelSpec, tuned_path: str) -> tuple[Any, Any]:
    """(model, tokenizer) with the adapter merged into float32 base weights (QLoRA: into the dequantised
    quantised base it was trained on, see ``dequantised_base``), or the fully fine-tuned model itself."""
    from transformers import AutoModelForCausalLM

    from finetune_pipeline.models.base import load_tokenizer, torch_dtype

    tok = load_tokenizer(tuned_path, model.trust_remote_code)  # with the chat template the adapter was trained with
    if model.method == "full":
        m = AutoModelForCausalLM.from_pretrained(tuned_path, dtype=torch_dtype("float32"), use_safetensors=True)
    else:
        from peft import PeftModel

        m = PeftModel.from_pretrained(dequantised_base(base_path, model), tuned_path).merge_and_unload()
    # generation stops at the EOS token the template ends answers with, in the registry as in training
    m.generation_config.eos_token_id = tok.eos_token_id
    m.generation_config.pad_token_id = tok.pad_token_id
    return m.eval(), tok


def tuned_model(base_path: str, model: ModelSpec, tuned_path: str) -> Any:
    """The trained weights as trained: base (QLoRA: dequantised) + adapter, unmerged, in float32 (the round-trip
    reference)."""
    from finetune_pipeline.models.base import load_for_eval

    fp32 = model.model_copy(update={"dtype": "float32"})
    if model.method == "full":
        return load_for_eval(tuned_path, fp32, None)[0]
    if model.method == "qlora":
        from peft import PeftModel

        return PeftModel.from_pretrained(dequantised_base(base_path, model), tuned_path).eval()
    return load_for_eval(base_path, fp32, tuned_path)[0]


def max_logit_diff(a: Any, b: Any, tok: Any, text: str = PROBE_TEXT) -> float:
    """Largest absolute difference between two models' logits on the same input."""
    import torch

    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        la = a(**{k: v.to(next(a.parameters()).device) for k, v in ids.items()}).logits.float().cpu()
        lb = b(**{k: v.to(next(b.parameters()).device) for k, v in ids.items()}).logits.float().cpu()
    return float((la - lb).abs().max())
