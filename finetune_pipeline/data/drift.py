"""Drift of a new drop against the current training split: a score in [0, 1] per aspect and overall.

- length: two-sample Kolmogorov-Smirnov statistic of the rows' character lengths;
- turns: total variation distance of the number-of-messages distributions;
- labels: total variation distance of the label mix (when both sides have labels);
- vocabulary: Jensen-Shannon divergence (base 2, in [0, 1]) of the word distributions (the 5,000 most frequent
  words of each side).
The overall score is the largest of them, so one aspect moving is enough to warn.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from finetune_pipeline.data.messages import messages_text
from finetune_pipeline.layout import Record

MAX_ROWS = 50_000
TOP_WORDS = 5_000


class DriftReport(Record):
    """Drift of one drop against the training split (stored per drop; the retraining schedule reads it)."""

    components: dict[str, float]
    rows_new: int
    rows_reference: int

    @property
    def score(self) -> float:
        return max(self.components.values(), default=0.0)

    def as_dict(self) -> dict[str, object]:
        return {
            "score": round(self.score, 4),
            **{k: round(v, 4) for k, v in self.components.items()},
            "rows_new": self.rows_new,
            "rows_reference": self.rows_reference,
        }


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return 0.0
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def tvd(a: pd.Series, b: pd.Series) -> float:
    pa_, pb_ = a.value_counts(normalize=True), b.value_counts(normalize=True)
    keys = pa_.index.union(pb_.index)
    return float(0.5 * np.abs(pa_.reindex(keys, fill_value=0) - pb_.reindex(keys, fill_value=0)).sum())


def _word_freq(messages: pd.Series) -> pd.Series:
    words = pc.utf8_split_whitespace(pc.utf8_lower(messages_text(pa.array(messages.tolist(), pa.string()))))
    flat = pc.list_flatten(words)
    vc = pc.value_counts(flat)
    return pd.Series(vc.field("counts").to_numpy(), index=vc.field("values").to_pylist())


def js_divergence(p: pd.Series, q: pd.Series) -> float:
    keys = p.sort_values(ascending=False).index[:TOP_WORDS].union(q.sort_values(ascending=False).index[:TOP_WORDS])
    pv = p.reindex(keys, fill_value=0).to_numpy(float)
    qv = q.reindex(keys, fill_value=0).to_numpy(float)
    if pv.sum() == 0 or qv.sum() == 0:
        return 0.0
    pv, qv = pv / pv.sum(), qv / qv.sum()
    m = 0.5 * (pv + qv)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = lambda x: np.nansum(np.where(x > 0, x * np.log2(x / m), 0.0))  # noqa: E731
        return float(min(1.0, max(0.0, 0.5 * kl(pv) + 0.5 * kl(qv))))


def _sample(df: pd.DataFrame) -> pd.DataFrame:
    if len(df) <= MAX_ROWS:
        return df
    return df.sort_values("content_hash").head(MAX_ROWS)  # deterministic


def drift(new: pd.DataFrame, reference: pd.DataFrame) -> DriftReport:
    new, ref = _sample(new), _sample(reference)
    comp = {
        "length": ks_statistic(new["chars"].to_numpy(float), ref["chars"].to_numpy(float)),
        "turns": tvd(new["n_messages"], ref["n_messages"]),
        "vocabulary": js_divergence(_word_freq(new["messages"]), _word_freq(ref["messages"])),
    }
    if "label" in new and "label" in ref and new["label"].notna().any() and ref["label"].notna().any():
        comp["labels"] = tvd(new["label"].dropna().astype(str), ref["label"].dropna().astype(str))
    return DriftReport(components=comp, rows_new=len(new), rows_reference=len(ref))
