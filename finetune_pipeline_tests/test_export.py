"""Release export on a tiny from_config llama: the merged weights saved as bf16 / fp16 safetensors reload with
their dtype and the merged model's logits; a QLoRA adapter merges into the dequantised 4-bit base (close to the
adapter's own outputs on the 4-bit model, closer than a merge into the unquantised weights)."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def _adapter(base: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero weights on every linear layer (init_lora_weights=False), saved with the tokenizer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    m = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.mark.parametrize("fmt", ["safetensors_bf16", "safetensors_fp16"])
def test_safetensors_reload(tiny_model: Path, tmp_path: Path, fmt: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune_pipeline.release.export import SAFETENSORS_DTYPES, save_safetensors
    from finetune_pipeline.release.score import load_artifact

    merged = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    dtype = SAFETENSORS_DTYPES[fmt]
    out = save_safetensors(merged, tok, tmp_path / fmt, dtype)
    stored = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert stored.dtype == getattr(torch, dtype) and (out / "chat_template.jinja").exists()
    back, back_tok, loader, compute = load_artifact(fmt, out)
    assert back_tok.chat_template == tok.chat_template and dtype in loader
    ids = tok("Ticket 3: the sync fails", return_tensors="pt")
    with torch.no_grad():
        diff = (back(**ids).logits.float() - merged(**ids).logits).abs().max().item()
    assert 0 < diff < 5e-2, diff  # rounded weights: close, not identical


def test_qlora_merges_into_the_dequantised_base(tiny_model: Path, tmp_path: Path) -> None:
    from finetune_pipeline.models.base import load_for_eval
    from finetune_pipeline.models.merge import max_logit_diff, standalone_model
    from finetune_pipeline.release.export import MERGE_TOLERANCE, merge_check
    from finetune_pipeline.spec import ModelSpec

    adapter = _adapter(tiny_model, tmp_path / "adapter")
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    q = ModelSpec(base=str(tiny_model), method="qlora", dtype="float32", lora=lora)
    merged, tok = standalone_model(str(tiny_model), q, str(adapter))
    diff = merge_check(str(tiny_model), q, str(adapter), merged, tok)
    assert diff is not None and diff < MERGE_TOLERANCE
    # the merge a rival does: the adapter folded into the unquantised weights, further from what was evaluated
    naive, _ = standalone_model(str(tiny_model), q.model_copy(update={"method": "lora"}), str(adapter))
    evaluated, _ = load_for_eval(str(tiny_model), q, str(adapter))
    assert max_logit_diff(naive, evaluated, tok) > 5 * diff
