"""The datasets a run reads, recorded on its MLflow run (lineage from a model back to its rows)."""

from __future__ import annotations

from finetune_pipeline.layout import PipelineLayout
from finetune_pipeline.spec import LoadedSpec
from finetune_pipeline.tracking.registry import DatasetRef
from finetune_pipeline.tracking.tracker import RunLog

SPLIT_CONTEXT = {"train": "training", "validation": "validation", "test": "evaluation"}


def split_dataset(spec: LoadedSpec, split: str, digest: str) -> DatasetRef:
    """A split as MLflow names it (the same name and digest as the runs' dataset inputs)."""
    return DatasetRef(name=f"{spec.name}/dataset_splits/{split}", digest=digest)


def log_splits(
    run: RunLog, layout: PipelineLayout, spec: LoadedSpec, frames: dict, digests: dict[str, str], which: list[str]
) -> None:
    """A dataset input on ``run`` for each split it reads, with the split's digest (the same as in dataset_splits'
    metadata)."""
    for s in which:
        ref = split_dataset(spec, s, digests[s])
        run.log_dataset(
            frames[s][["row_id", "drop", "source_line", "content_hash"]],
            name=ref.name,
            digest=ref.digest,
            source=str(layout.split(s)),
            context=SPLIT_CONTEXT[s],
        )
