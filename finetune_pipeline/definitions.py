"""Dagster entry point: every spec in the specs folder becomes its own asset group.

The folder is ``FINETUNE_SPECS`` (default ``./specs``). Importing this module must stay light: no torch.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import dagster as dg

from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.paths import specs_dir
from finetune_pipeline.spec import load_specs_report


def build_definitions(folder: Path | None = None) -> dg.Definitions:
    folder = folder or specs_dir()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"specs folder {folder} does not exist: set FINETUNE_SPECS or run from the repository root"
        )
    specs, broken = load_specs_report(folder)
    return dg.Definitions.merge(
        *[build_pipeline_defs(s) for s in specs],
        dg.Definitions(
            assets=spec_error_assets(broken), resources=default_resources(), executor=dg.in_process_executor
        ),
    )


def spec_error_assets(broken: dict[Path, list[str]]) -> list[dg.AssetSpec]:
    """A broken spec must not take the other pipelines down: it is reported as a warning (printed by
    ``dagster definitions validate``) and as an asset ``spec_errors/<file>`` whose description lists the problems."""
    out = []
    for path, problems in broken.items():
        msg = f"pipeline spec {path} is broken and was skipped:\n" + "\n".join(f"  - {p}" for p in problems)
        print(f"WARNING: {msg}", file=sys.stderr)
        warnings.warn(msg, stacklevel=2)
        out.append(
            dg.AssetSpec(
                key=["spec_errors", re.sub(r"\W", "_", path.stem)],
                group_name="spec_errors",
                description=f"BROKEN SPEC {path.name}, its pipeline is not loaded: " + " | ".join(problems),
                metadata={"spec_file": dg.MetadataValue.path(str(path)), "problems": dg.MetadataValue.json(problems)},
            )
        )
    return out


defs = build_definitions()
