"""Dagster entry point: every spec in the specs folder becomes its own asset group.

The folder is ``FINETUNE_SPECS`` (default ``./specs``). Importing this module must stay light: no torch.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.paths import specs_dir
from finetune_pipeline.spec import load_specs


def build_definitions(folder: Path | None = None) -> dg.Definitions:
    folder = folder or specs_dir()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"specs folder {folder} does not exist: set FINETUNE_SPECS or run from the repository root"
        )
    specs = load_specs(folder)
    return dg.Definitions.merge(
        *[build_pipeline_defs(s) for s in specs],
        dg.Definitions(resources=default_resources(), executor=dg.in_process_executor),
    )


defs = build_definitions()
