"""Helpers over canonical messages JSON (the ``messages`` column of every cleaned row)."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def messages_text(messages_json: pa.Array | list[str]) -> pa.Array:
    """Plain-ish text of canonical messages JSON (contents only) for shingling, without parsing each row."""
    arr = pa.array(messages_json, pa.string()) if isinstance(messages_json, list) else messages_json
    x = pc.replace_substring_regex(arr, r'\{"role": "[a-z]+", "content": "|"\}(, )?|\\[nrt]', " ")
    return x


_LAST_MESSAGE = r'(, )?\{"role": "[a-z]+", "content": "(?:[^"\\]|\\.)*"\}\]$'


def prompt_texts(messages_json: pd.Series | list[str]) -> pa.Array:
    """Canonical messages JSON without the last message: what a row asks, for prompt-overlap counts."""
    return pc.replace_substring_regex(pa.array(list(messages_json), pa.string()), _LAST_MESSAGE, "]")


_ALL_BUT_LAST_CONTENT = r'^.*\{"role": "[a-z]+", "content": "((?:[^"\\]|\\.)*)"\}\]$'


def prompt_answer_texts(messages_json: pd.Series | list[str]) -> tuple[pa.Array, pa.Array]:
    """Per row: the prompt side (contents of every message but the last) and the answer side (the last message's
    content) as plain-ish text for shingling, without parsing each row."""
    arr = pa.array(list(messages_json), pa.string())
    prompt = messages_text(prompt_texts(list(messages_json)))
    answer = pc.replace_substring_regex(pc.replace_substring_regex(arr, _ALL_BUT_LAST_CONTENT, r"\1"), r"\\[nrt]", " ")
    del arr
    return prompt, answer


def to_prompt_completion(messages_json: str) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion record for trl: the loss then falls on the final assistant turn."""
    msgs = json.loads(messages_json)
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}
