"""The GGUF exporter on a tiny from_config llama: files written, read back with gguf.GGUFReader (metadata and chat
template), and loaded back through transformers' GGUF loader with the same logits (f16 closely, q8_0 within
quantisation error)."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tiny_pair(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize(("kind", "tensor_type", "tolerance"), [("gguf_f16", "F16", 2e-3), ("gguf_q8_0", "Q8_0", 3e-2)])
def test_gguf_round_trip(tiny_pair, tmp_path: Path, kind: str, tensor_type: str, tolerance: float) -> None:  # type: ignore[no-untyped-def]
    import torch

    from finetune_pipeline.release.gguf_export import load_gguf, read_metadata, serving_template, write_gguf

    model, tok = tiny_pair
    path = tmp_path / f"{kind}.gguf"
    info = write_gguf(model, tok, path, kind, "tiny")
    assert path.stat().st_size > 0 and info["stop"] == "<|im_end|>"
    meta = read_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.chat_template"] == serving_template(tok.chat_template)
    assert "generation %}" not in meta["tokenizer.chat_template"]
    assert meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.tokens"] == len(tok) and meta["llama.block_count"] == model.config.num_hidden_layers
    assert tensor_type in meta["tensor_types"] and "F32" in meta["tensor_types"]  # norms stay float32

    back, back_tok = load_gguf(path)
    text = "Ticket 7: the export fails with error E7 since 2024"
    ids = tok(text, return_tensors="pt")
    assert back_tok(text)["input_ids"] == ids["input_ids"][0].tolist()
    assert back_tok.chat_template == tok.chat_template
    with torch.no_grad():
        diff = (back(**ids).logits - model(**ids).logits).abs().max().item()
    assert diff < tolerance, f"{kind}: max |logit diff| {diff}"


def test_q_k_permutation_matters(tiny_pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The q/k rows are permuted to GGML's rotary layout, which transformers' loader undoes: the export matches,
    an export without the permutation does not (q/k scaled up so that attention, not noise, decides the logits)."""
    import copy

    import torch

    from finetune_pipeline.release import gguf_export

    model, tok = tiny_pair
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for layer in sharp.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    ids = tok("a b c d e f g h", return_tensors="pt")

    def diff(path: Path) -> float:
        back, _ = gguf_export.load_gguf(path)
        with torch.no_grad():
            return (back(**ids).logits - sharp(**ids).logits).abs().max().item()

    gguf_export.write_gguf(sharp, tok, tmp_path / "ok.gguf", "gguf_f16", "tiny")
    saved = gguf_export._permute
    gguf_export._permute = lambda w, n: w  # type: ignore[assignment]
    try:
        gguf_export.write_gguf(sharp, tok, tmp_path / "raw.gguf", "gguf_f16", "tiny")
    finally:
        gguf_export._permute = saved
    right, wrong = diff(tmp_path / "ok.gguf"), diff(tmp_path / "raw.gguf")
    assert wrong > 5 * right, (right, wrong)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from finetune_pipeline.release.gguf_export import UnsupportedForGguf, write_gguf

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedForGguf, match="convert_hf_to_gguf"):
        write_gguf(m, AutoTokenizer, tmp_path / "x.gguf", "gguf_f16", "x")
