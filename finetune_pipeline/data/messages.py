"""Helpers over canonical messages JSON (the ``messages`` column of every cleaned row)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def messages_text(messages_json: pa.Array | list[str]) -> pa.Array:
    """Plain-ish text of canonical messages JSON (contents only) for shingling, without parsing each row."""
    arr = pa.array(messages_json, pa.string()) if isinstance(messages_json, list) else messages_json
    x = pc.replace_substring_regex(arr, r'\{"role": "[a-z]+", "content": "|"\}(, )?|\\[nrt]', " ")
    return x


_SEP = '}, {"role": "'  # between two messages; inside a content its quotes would be escaped


def _split_last(messages_json: pd.Series | list[str]) -> tuple[pa.Array, pa.Array, pa.Array]:
    """Each row cut once, from the right, before its last message: (everything before it, the last message, whether
    the row has a single message). Arrow splits the strings; nothing is parsed."""
    parts = pc.split_pattern(pa.array(list(messages_json), pa.string()), _SEP, max_splits=1, reverse=True)
    offsets = parts.offsets.to_numpy()
    flat = parts.flatten()
    return flat.take(pa.array(offsets[:-1])), flat.take(pa.array(offsets[1:] - 1)), pa.array(np.diff(offsets) == 1)


def _prompts(head: pa.Array, single: pa.Array) -> pa.Array:
    return pc.if_else(single, pa.scalar("[]"), pc.binary_join_element_wise(head, "}]", ""))


def prompt_texts(messages_json: pd.Series | list[str]) -> pa.Array:
    """Canonical messages JSON without the last message: what a row asks, for prompt-overlap counts."""
    head, _, single = _split_last(messages_json)
    return _prompts(head, single)


def prompt_answer_texts(messages_json: pd.Series | list[str]) -> tuple[pa.Array, pa.Array]:
    """Per row: the prompt side (contents of every message but the last) and the answer side (the last message's
    content) as plain-ish text for shingling, without parsing each row."""
    head, last, single = _split_last(messages_json)
    answer = pc.replace_substring_regex(last, r'^(?:\[\{"role": ")?[a-z]+", "content": "', "", max_replacements=1)
    answer = pc.utf8_slice_codeunits(answer, 0, -3)  # the closing '"}]'
    return messages_text(_prompts(head, single)), pc.replace_substring_regex(answer, r"\\[nrt]", " ")


def to_prompt_completion(messages_json: str) -> dict[str, list[dict[str, str]]]:
    """Conversational prompt/completion record for trl: the loss then falls on the final assistant turn."""
    msgs = json.loads(messages_json)
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}
