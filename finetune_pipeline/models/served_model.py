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


def _conversations(model_input: Any) -> tuple[list[list[dict[str, str]]], bool]:
    """(conversations, chat request?) from any accepted input shape."""
    if isinstance(model_input, dict) and "messages" in model_input:
        msgs = model_input["messages"]
        return [[{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]], True
    if isinstance(model_input, str):
        return [[{"role": "user", "content": model_input}]], False
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [dict(zip(model_input, v, strict=True)) for v in zip(*model_input.values(), strict=True)]
    out = []
    for row in model_input:
        if isinstance(row, str):
            out.append([{"role": "user", "content": row}])
        elif row.get("messages") is not None and len(row["messages"]) > 0:
            out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"]])
        elif row.get("prompt") is not None:
            out.append([{"role": "user", "content": str(row["prompt"])}])
        else:
            raise ValueError("each row needs 'messages' (a list of {role, content}) or 'prompt' (a string)")
    return out, False


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
        convs, chat = _conversations(model_input)
        answers, eos = _generate_answers()(
            self.model,
            self.tok,
            convs,
            max_new,
            float(p.get("temperature") or 0.0),
            int(p.get("batch_size", 16)),
            int(p.get("seed") or 0),
        )
        if chat:
            return {
                "object": "chat.completion",
                "model": self.defaults.get("model_name", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answers[0]},
                        "finish_reason": "stop" if eos[0] else "length",
                    }
                ],
            }
        return answers


mlflow.models.set_model(ChatModel())
