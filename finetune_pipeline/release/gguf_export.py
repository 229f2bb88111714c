"""GGUF export of a merged Llama-architecture model (f16 or q8_0), written with the ``gguf`` package (GGUFWriter,
the tensor name map, and its Q8_0 quantiser) the way llama.cpp's ``convert_hf_to_gguf.py`` writes a LlamaForCausalLM:
the same metadata keys, the q/k projection rows permuted to GGML's rotary layout, norms kept in float32, the
tokenizer as a GPT-2 BPE vocabulary with its merges, and the chat template as ``tokenizer.chat_template``.

torch / transformers are imported inside functions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SUPPORTED = ("LlamaForCausalLM",)
GGUF_TYPES = {"gguf_f16": "F16", "gguf_q8_0": "Q8_0"}
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


class UnsupportedForGguf(ValueError):
    """A model or tokenizer this exporter does not write (the message names the alternative)."""


def serving_template(template: str) -> str:
    """The chat template as a server renders it: trl's ``{% generation %}`` markers (training-only, unknown to
    llama.cpp's and Ollama's Jinja) removed; the rendered text is unchanged."""
    return _GENERATION_TAG.sub("", template)


def _permute(w: Any, n_head: int) -> Any:
    """HF's rotary layout -> GGML's (llama.cpp LlamaModel.permute); transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(tok: Any) -> tuple[list[str], list[int], list[str], str]:
    """(tokens by id, token types, merges, llama.cpp pre-tokenizer name) of a GPT-2-style byte-level BPE tokenizer."""
    import gguf

    raw = json.loads(tok.backend_tokenizer.to_str())
    model, pre = raw.get("model", {}), raw.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel":
        raise UnsupportedForGguf(
            "the GGUF exporter writes byte-level BPE (GPT-2 style) tokenizers only; for this tokenizer use llama.cpp's "
            "convert_hf_to_gguf.py on the exported safetensors folder, or drop gguf_* from release.formats"
        )
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(size):
        t = by_id.get(i, f"[PAD{i}]")
        tokens.append(t)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # SmolLM2's vocabulary: llama.cpp knows its pre-tokenizer as "smollm"; another ByteLevel BPE: GPT-2's
    pre_name = "smollm" if size == 49152 and tokens[1] == "<|im_start|>" else "gpt2"
    return tokens, [int(x) for x in types], merges, pre_name


def write_gguf(model: Any, tok: Any, out: Path, kind: str, name: str) -> dict[str, Any]:
    """Write ``model`` (a merged float32 LlamaForCausalLM) and ``tok`` to ``out`` as ``kind`` (gguf_f16 |
    gguf_q8_0). Returns what was written (tensor count, types, template, stop token)."""
    import gguf
    import numpy as np

    arch = (model.config.architectures or [type(model).__name__])[0]
    if arch not in SUPPORTED:
        raise UnsupportedForGguf(
            f"GGUF export supports {SUPPORTED}, not {arch}: convert the exported safetensors folder with llama.cpp's "
            "convert_hf_to_gguf.py, or drop gguf_* from release.formats"
        )
    cfg = model.config
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[kind])
    ftype = gguf.LlamaFileType.MOSTLY_F16 if kind == "gguf_f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    template = serving_template(tok.chat_template or "")
    tokens, types, merges, pre = _vocab(tok)

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(name)
    w.add_vocab_size(len(tokens))
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for add, tid in (
        (w.add_bos_token_id, tok.bos_token_id),
        (w.add_eos_token_id, tok.eos_token_id),
        (w.add_unk_token_id, tok.unk_token_id),
        (w.add_pad_token_id, tok.pad_token_id),
    ):
        if tid is not None:
            add(int(tid))
    w.add_add_bos_token(False)  # the chat template prints every special token itself
    w.add_add_space_prefix(False)
    if template:
        w.add_chat_template(template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    written: dict[str, str] = {}
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise UnsupportedForGguf(f"no GGUF name for tensor {hf_name}: use llama.cpp's convert_hf_to_gguf.py")
        data = t.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        if data.ndim == 1:
            w.add_tensor(gname, data.astype(np.float32))
            written[gname] = "F32"
        elif kind == "gguf_f16":
            w.add_tensor(gname, data.astype(np.float16))
            written[gname] = "F16"
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            written[gname] = "Q8_0"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    eos = tok.convert_ids_to_tokens(tok.eos_token_id) if tok.eos_token_id is not None else None
    return {
        "file": out.name,
        "tensors": len(written),
        "tensor_types": sorted(set(written.values())),
        "tokenizer_pre": pre,
        "chat_template_embedded": bool(template),
        "stop": eos,
    }


def read_metadata(path: Path) -> dict[str, Any]:
    """Scalar and string metadata of a GGUF file (token lists left out), read back with ``gguf.GGUFReader``."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for k, f in r.fields.items():
        if k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            out[k] = len(f.data)
            continue
        out[k] = f.contents()
    out["tensor_types"] = sorted({t.tensor_type.name for t in r.tensors})
    out["tensor_count"] = len(r.tensors)
    return out


def load_gguf(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a GGUF file through transformers' GGUF loader (dequantised to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), tok
