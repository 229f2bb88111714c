"""Token counts with the base model's tokenizer and chat template, without importing transformers.

The tokenizer is the model folder's ``tokenizer.json`` (the Rust ``tokenizers`` library); the chat template is
rendered with Jinja2 like transformers does, so a count is what training sees for that row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class TokenCounter:
    def __init__(self, model_dir: str | Path):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        d = Path(model_dir)
        if not (d / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{d} has no tokenizer.json: token statistics need a local model folder (materialize base_model)"
            )
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
        template = cfg.get("chat_template")
        if (d / "chat_template.jinja").exists():
            template = (d / "chat_template.jinja").read_text()
        if not template:
            raise ValueError(f"{d} has no chat template (tokenizer_config.json chat_template or chat_template.jinja)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template)
        self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token")}

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages=messages, add_generation_prompt=False, **self.special)

    def __call__(self, messages_json: list[str]) -> np.ndarray:
        texts = [self.render(json.loads(m)) for m in messages_json]
        out = np.zeros(len(texts), np.int64)
        step = 4096
        for i in range(0, len(texts), step):
            enc = self.tokenizer.encode_batch(texts[i : i + step], add_special_tokens=False)
            out[i : i + step] = [len(e.ids) for e in enc]
        return out


def _raise(msg: str) -> None:
    raise ValueError(msg)


def length_stats(tokens: np.ndarray, max_length: int) -> dict[str, float]:
    if len(tokens) == 0:
        return {"rows": 0}
    over = int((tokens > max_length).sum())
    return {
        "rows": len(tokens),
        "mean": round(float(tokens.mean()), 1),
        "p50": float(np.percentile(tokens, 50)),
        "p90": float(np.percentile(tokens, 90)),
        "p99": float(np.percentile(tokens, 99)),
        "max": int(tokens.max()),
        "over_max_length": over,
        "over_max_length_share": round(over / len(tokens), 4),
    }
