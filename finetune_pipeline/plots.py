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


def study_plots(study_name: str, storage_uri: str) -> dict[str, bytes]:
    """The sweep's optimisation history (each finished trial's value and the best so far) and, with two or more
    completed trials, Optuna's parameter importances (fANOVA)."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage_uri)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[str, bytes] = {}
    if not done:
        return out
    fig, ax = _figure((5.5, 3))
    xs, ys = [t.number for t in done], [float(t.value) for t in done]  # type: ignore[arg-type]
    ax.scatter(xs, ys, label="trial")
    ax.step(xs, np.minimum.accumulate(ys), where="post", color="red", label="best so far")
    pruned = [t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    for n in pruned:
        ax.axvline(n, color="grey", alpha=0.3)
    ax.set_xlabel("trial (grey: pruned)")
    ax.set_ylabel("validation loss")
    ax.legend()
    out["optimisation_history"] = _png(fig)
    if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
        imp = optuna.importance.get_param_importances(study)
        fig, ax = _figure((5, 0.5 + 0.4 * len(imp)))
        ax.barh(list(imp)[::-1], list(imp.values())[::-1])
        ax.set_xlabel("importance (fANOVA)")
        out["param_importances"] = _png(fig)
    return out
