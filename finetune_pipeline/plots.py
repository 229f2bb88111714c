"""Plots as PNG bytes (matplotlib, imported only when a plot is drawn): shown in Dagster, logged to MLflow."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _figure(size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def loss_curve(train: list[tuple[int, float]], validation: list[tuple[int, float]], title: str) -> bytes | None:
    """Train (and validation) loss against step, or None when nothing was logged."""
    if not train:
        return None
    fig, ax = _figure((5, 3))
    ax.plot([h[0] for h in train], [h[1] for h in train], marker="o", label="train")
    if validation:
        ax.plot([h[0] for h in validation], [h[1] for h in validation], marker="s", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{title} adapter")
    ax.legend()
    return _png(fig)


def token_histogram(lengths: dict[str, np.ndarray], max_length: int) -> bytes:
    """Token lengths per split against training.max_length."""
    fig, ax = _figure((7, 3.2))
    hi = max(max_length, *(int(v.max()) for v in lengths.values() if len(v))) + 1
    bins = list(range(0, hi + 8, max(1, hi // 60)))
    for s, v in lengths.items():
        if len(v):
            ax.hist(v, bins=bins, alpha=0.6, label=f"{s} ({len(v)})")
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per row (chat template applied)")
    ax.set_ylabel("rows")
    ax.legend()
    return _png(fig)
