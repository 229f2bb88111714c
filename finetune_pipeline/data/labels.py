"""Label normalisation (source.labels): strip, lowercase, then a mapping table, before anything reads the labels
(the stratified split, the label-balance check, the label drift and the label-conflict report)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from finetune_pipeline.spec import LabelSpec


def _clean(values: pd.Series, spec: LabelSpec) -> pd.Series:
    out = values.astype("string")
    if spec.strip:
        out = out.str.strip()
    if spec.lowercase:
        out = out.str.lower()
    return out


def normalise_labels(values: pd.Series, spec: LabelSpec) -> tuple[pd.Series, np.ndarray]:
    """The normalised labels (object dtype; missing stays None, a label mapped to '' becomes None) and a mask of
    the rows whose label is unknown (``unmapped: quarantine``: neither a mapping key nor a mapping value)."""
    unknown = np.zeros(len(values), bool)
    if not spec.active or not len(values):
        return values, unknown
    out = _clean(values, spec)
    if spec.mapping:
        keys = _clean(pd.Series(list(spec.mapping)), spec).tolist()
        table = dict(zip(keys, spec.mapping.values(), strict=True))
        mapped = out.map(table)
        if spec.unmapped == "quarantine":
            known = set(table) | set(spec.mapping.values())
            unknown = (out.notna() & ~out.isin(known)).to_numpy()
        out = mapped.where(out.isin(list(table)), out)
    out = out.astype(object).where(out.notna() & (out.astype("string") != ""), None)
    return out, unknown
