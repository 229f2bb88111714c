"""Row quality score from the checks the fine-tuning guides recommend, computed column-wise on the answers.

score = 1 - penalties, clipped to [0, 1]:
- refusal / placeholder marker ("I cannot", "TODO", ...): 0.6
- invalid JSON where the answer looks like JSON (starts with '{', or '[' then a value): 0.6
- unbalanced brackets ((), [], {}): 0.3
- truncated ending (an answer of 5+ words that stops without closing punctuation): 0.3
- repetition: the share of repeated word 3-grams in answers of 16+ words (0..1)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from finetune_pipeline.spec import QualitySpec

PENALTY = {"marker": 0.6, "invalid_json": 0.6, "unbalanced_brackets": 0.3, "truncated": 0.3}
_ENDING = r"[.!?…。！？:;\"'”’)\]}>`*|~_0-9%]\s*$"
_RE2_META = re.compile(r"([\\.^$|?*+()\[\]{}])")


@dataclass
class Quality:
    score: np.ndarray
    signals: dict[str, np.ndarray]  # per check: bool (or the repetition share)

    def explain(self, i: int) -> str:
        parts = [f"score {self.score[i]:.2f}"]
        for name, v in self.signals.items():
            if name == "repetition":
                if v[i] > 0:
                    parts.append(f"repetition {v[i]:.2f}")
            elif v[i]:
                parts.append(name.replace("_", " "))
        return "; ".join(parts)


def _re2_escape(s: str) -> str:
    return _RE2_META.sub(r"\\\1", s)


def repetition(text: str) -> float:
    w = text.lower().split()
    grams = list(zip(w, w[1:], w[2:], strict=False))
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def score(answers: pa.Array, spec: QualitySpec) -> Quality:
    n = len(answers)
    answers = answers.cast(pa.string()).fill_null("")
    if spec.markers:
        pattern = "(?i)(" + "|".join(_re2_escape(m) for m in spec.markers) + ")"
        marker = pc.match_substring_regex(answers, pattern).to_numpy(zero_copy_only=False)
    else:
        marker = np.zeros(n, bool)
    trimmed = pc.utf8_trim_whitespace(answers)
    looks_json = pc.match_substring_regex(trimmed, r'^(\{|\[\s*[\[{"0-9\-\]])').to_numpy(zero_copy_only=False)
    invalid_json = np.zeros(n, bool)
    if looks_json.any():
        idx = np.flatnonzero(looks_json)
        for i, text in zip(idx, trimmed.take(pa.array(idx)).to_pylist(), strict=True):
            try:
                json.loads(text)
            except ValueError:
                invalid_json[i] = True
    unbalanced = np.zeros(n, bool)
    for a, b in (("(", ")"), ("[", "]"), ("{", "}")):
        unbalanced |= pc.count_substring(answers, a).to_numpy() != pc.count_substring(answers, b).to_numpy()
    unbalanced &= ~(looks_json & ~invalid_json)  # valid JSON is balanced (brackets inside strings may not be)
    words = pc.count_substring_regex(answers, r"\S+").to_numpy()
    ends_ok = pc.match_substring_regex(answers, _ENDING).to_numpy(zero_copy_only=False)
    truncated = (words >= 5) & ~ends_ok & ~looks_json
    rep = np.zeros(n)
    long_rows = np.flatnonzero(words >= 16)
    if len(long_rows):
        for i, text in zip(long_rows, answers.take(pa.array(long_rows)).to_pylist(), strict=True):
            rep[i] = repetition(text)
    s = 1.0 - (
        PENALTY["marker"] * marker
        + PENALTY["invalid_json"] * invalid_json
        + PENALTY["unbalanced_brackets"] * unbalanced
        + PENALTY["truncated"] * truncated
        + rep
    )
    signals = {
        "marker": marker,
        "invalid_json": invalid_json,
        "unbalanced_brackets": unbalanced,
        "truncated": truncated,
        "repetition": rep,
    }
    return Quality(np.clip(s, 0.0, 1.0), signals)
