"""The datasets a run reads, recorded on its MLflow run (lineage from a model back to its rows)."""

from __future__ import annotations

from finetune_pipeline.layout import PipelineLayout
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.tracking import mlflow_store

SPLIT_CONTEXT = {"train": "training", "validation": "validation", "test": "evaluation"}


def log_splits(
    layout: PipelineLayout, spec: LoadedSpec, frames: dict, digests: dict[str, str], which: list[str]
) -> None:
    """log_input for each split a run reads, with the split's digest (the same as in dataset_splits' metadata)."""
    for s in which:
        mlflow_store.log_dataset(
            frames[s][["row_id", "drop", "source_line", "content_hash"]],
            name=f"{spec.name}/dataset_splits/{s}",
            digest=digests[s],
            source=str(layout.split(s)),
            context=SPLIT_CONTEXT[s],
        )
