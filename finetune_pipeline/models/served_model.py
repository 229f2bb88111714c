"""The registered model's serving code (MLflow models-from-code): the merged weights and tokenizer with the chat
template they were trained and evaluated with, generation through the same function evaluation used.

One answer per input row, in order. Accepted request shapes (``mlflow models serve``, POST /invocations):

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: one conversation, answered as a chat completion;
- ``{"inputs": {"prompt": "..."}}`` or ``{"inputs": {"prompt": ["...", "..."]}}``: one row per prompt;
- ``{"inputs": {"messages": [conversation, ...]}}`` (or one conversation): one row per conversation;
- ``{"dataframe_records": [{"prompt": ...} | {"messages": [...]}, ...]}`` and the same columns as
  ``dataframe_split``: one row per record;
- ``{"inputs": "..."}`` or ``{"inputs": ["...", "..."]}``: bare strings, one row each.

Anything else is refused with a 400 naming these shapes (never guessed). The model's signature declares only params
(max_new_tokens / max_tokens, temperature, seed): without an input schema MLflow hands the request's structure to
``predict`` as sent instead of folding a dict of lists into one row. This file is never imported by the package:
MLflow loads it from the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow

ROLES = ("system", "user", "assistant")
ACCEPTED = (
    'accepted shapes: {"messages": [{"role", "content"}, ...]}; {"inputs": {"prompt": "text" or ["text", ...]}}; '
    '{"inputs": {"messages": [conversation, ...]}}; {"dataframe_records": [{"prompt": "text"} or '
    '{"messages": [...]}, ...]}; {"dataframe_split": {"columns": ["prompt"] or ["messages"], "data": [...]}}; '
    '{"inputs": "text"} or {"inputs": ["text", ...]}'
)


def _refuse(why: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(f"{why}; {ACCEPTED}", error_code=INVALID_PARAMETER_VALUE)


def _plain(v: Any) -> Any:
    """numpy arrays and scalars (what MLflow's JSON parser makes of lists and strings) as Python values."""
    return v.tolist() if hasattr(v, "tolist") and not isinstance(v, str) else v


def _conversation(msgs: Any, where: str) -> list[dict[str, str]]:
    msgs = _plain(msgs)
    if not isinstance(msgs, list) or not msgs:
        raise _refuse(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or set(m) - {"role", "content"} or not isinstance(m.get("content"), str):
            raise _refuse(f"{where}: each message must be {{'role': ..., 'content': 'text'}}, got {m!r:.120}")
        if m.get("role") not in ROLES:
            raise _refuse(f"{where}: unknown role {m.get('role')!r} (roles: {', '.join(ROLES)})")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt(p: Any, where: str) -> list[dict[str, str]]:
    p = _plain(p)
    if not isinstance(p, str):
        raise _refuse(f"{where}: 'prompt' must be a string, got {type(p).__name__}")
    return [{"role": "user", "content": p}]


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and v != v)  # None or NaN (a column another record did not fill)


def _row(row: Any, where: str) -> tuple[list[dict[str, str]], bool]:
    """(conversation, given as chat messages?) of one record."""
    row = _plain(row)
    if isinstance(row, str):
        return _prompt(row, where), False
    if not isinstance(row, dict):
        raise _refuse(f"{where}: a row must be a string or an object with 'prompt' or 'messages'")
    unknown = sorted(set(map(str, row)) - {"prompt", "messages"})
    if unknown:
        raise _refuse(f"{where}: unknown field(s) {unknown}")
    given = {k: v for k, v in row.items() if not _missing(v)}
    if len(given) != 1:
        raise _refuse(f"{where}: each row needs exactly one of 'prompt' (a string) or 'messages' (a conversation)")
    if "messages" in given:
        return _conversation(given["messages"], where), True
    return _prompt(given["prompt"], where), False


def _columns(data: dict[str, Any]) -> tuple[list[tuple[list[dict[str, str]], bool]], bool]:
    """Rows of a dict input ({"prompt": ...} or {"messages": ...}); and whether it is one conversation sent as
    OpenAI-style chat (answered with a single chat completion)."""
    keys = set(map(str, data))
    if len(keys) != 1 or not keys <= {"prompt", "messages"}:
        raise _refuse(f"got the field(s) {sorted(keys)}: give exactly one of 'prompt' or 'messages'")
    if "prompt" in keys:
        v = _plain(data["prompt"])
        items = v if isinstance(v, list) else [v]
        return [(_prompt(p, f"prompt[{i}]"), False) for i, p in enumerate(items)], False
    raw = data["messages"]
    v = _plain(raw)
    if isinstance(v, list) and v and all(isinstance(m, dict) for m in v):  # one conversation
        return [(_conversation(v, "messages"), True)], isinstance(raw, list)
    if isinstance(v, list) and v and all(isinstance(c, list) for c in v):  # one conversation per row
        return [(_conversation(c, f"messages[{i}]"), True) for i, c in enumerate(v)], False
    raise _refuse("'messages' must be a conversation (a list of {role, content}) or a list of conversations")


def parse_rows(model_input: Any) -> tuple[list[tuple[list[dict[str, str]], bool]], bool]:
    """(conversation, given as chat messages?) per request row, in order, from any accepted shape; and whether the
    request was a single OpenAI-style conversation. Raises a 400-coded MlflowException for anything else."""
    single = False
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        rows = [_row(r, f"row {i}") for i, r in enumerate(model_input.to_dict(orient="records"))]
    elif isinstance(model_input, dict):
        rows, single = _columns(model_input)
    else:
        v = _plain(model_input)
        items = v if isinstance(v, list) else [v]
        rows = [_row(r, f"row {i}") for i, r in enumerate(items)]
    if not rows:
        raise _refuse("the request holds no rows")
    return rows, single


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
        if max_new < 1:
            raise _refuse(f"max_new_tokens must be >= 1, got {max_new}")
        rows, single = parse_rows(model_input)
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
        return out[0] if single else out


mlflow.models.set_model(ChatModel())
