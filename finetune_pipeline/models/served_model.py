"""The registered model's serving code (MLflow models-from-code): the merged weights and tokenizer with the chat
template they were trained and evaluated with, generation through the same function evaluation used.

Accepts OpenAI-style chat input (``{"messages": [...], "max_new_tokens": 32}``), string prompts
(``{"inputs": {"prompt": ["..."]}}`` or ``{"dataframe_records": [{"prompt": "..."}]}``) and conversations
(``{"dataframe_records": [{"messages": [...]}]}``); params ``max_new_tokens`` (alias ``max_tokens``),
``temperature`` and ``seed``. This file is never imported by the package: MLflow loads it from the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow


def _conversations(model_input: Any) -> list[tuple[list[dict[str, str]], bool]]:
    """(conversation, given as chat messages?) per request row, from any accepted input shape."""
    if isinstance(model_input, dict) and "messages" in model_input and isinstance(model_input["messages"], list):
        if model_input["messages"] and isinstance(model_input["messages"][0], dict):
            model_input = [{"messages": model_input["messages"]}]
    if isinstance(model_input, str):
        model_input = [model_input]
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [dict(zip(model_input, v, strict=True)) for v in zip(*model_input.values(), strict=True)]
    out = []
    for row in model_input:
        msgs = row.get("messages") if isinstance(row, dict) else None
        if isinstance(row, str):
            out.append(([{"role": "user", "content": row}], False))
        elif msgs is not None and len(msgs) > 0:
            out.append(([{"role": str(m["role"]), "content": str(m["content"])} for m in msgs], True))
        elif row.get("prompt") is not None:
            out.append(([{"role": "user", "content": str(row["prompt"])}], False))
        else:
            raise ValueError("each row needs 'messages' (a list of {role, content}) or 'prompt' (a string)")
    return out


def _completion(text: str, eos: bool, model: str) -> dict[str, Any]:
    return {
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop" if eos else "length",
            }
        ],
    }


def _generate_answers() -> Any:
    """The generation function evaluation used, shipped with the model (code_paths); the package's copy when
    MLflow executes this file at logging time, before code_paths are on the path."""
    try:
        from chat_generation import generate_answers
    except ImportError:
        from finetune_pipeline.models.chat_generation import generate_answers
    return generate_answers


class ChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["model"]
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
        self.defaults = json.loads((Path(path) / "serving.json").read_text())

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        max_new = int(p.get("max_tokens") or p["max_new_tokens"])
        rows = _conversations(model_input)
        answers, eos = _generate_answers()(
            self.model,
            self.tok,
            [c for c, _ in rows],
            max_new,
            float(p.get("temperature") or 0.0),
            int(p.get("batch_size", 16)),
            int(p.get("seed") or 0),
        )
        name = str(self.defaults.get("model_name", ""))
        out = [_completion(a, e, name) if chat else a for a, e, (_, chat) in zip(answers, eos, rows, strict=True)]
        return out[0] if len(out) == 1 and rows[0][1] else out


mlflow.models.set_model(ChatModel())
