"""Tier 2: the packaged SmolLM2-135M-Instruct GGUF becomes a safetensors folder once, then loads fast."""

import time
from pathlib import Path

import pytest

from finetune_pipeline.models.base import load_tokenizer, provision_base_model

pytestmark = pytest.mark.integration


def test_packaged_smollm2_provisioning(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    first = provision_base_model("smollm2-135m-instruct", target_root=tmp_path)
    assert first.converted and first.kind == "packaged"
    out = Path(first.path)
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin")) and not list(out.glob("*.gguf"))
    again = provision_base_model("smollm2-135m-instruct", target_root=tmp_path)
    assert not again.converted and again.digest == first.digest and again.seconds < 5
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    load_s = time.perf_counter() - t0
    tok = load_tokenizer(str(out))
    assert tok.eos_token == "<|im_end|>"  # transformers 5.x builds the GGUF tokenizer right
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert load_s < 10


def test_local_folder_must_hold_safetensors(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="only safetensors are loaded"):
        provision_base_model(str(tmp_path / "m"))
    assert provision_base_model("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
