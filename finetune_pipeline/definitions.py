"""Dagster entry point: every spec in the specs folder, and every FineTunePipeline component in the dg project's
defs folder, becomes its own asset group.

The specs folder is ``FINETUNE_SPECS`` (default ``./specs``). Importing this module must stay light: no torch.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import dagster as dg

from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.paths import PROJECT_ROOT, specs_dir
from finetune_pipeline.spec import load_specs_report


def build_definitions(folder: Path | None = None, project_root: Path | None = PROJECT_ROOT) -> dg.Definitions:
    """Every spec in the specs folder, plus every FineTunePipeline component in the dg project's defs folder
    (``finetune_pipeline/pipelines/NAME/defs.yaml``; none when ``project_root`` is None)."""
    folder = folder or specs_dir()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"specs folder {folder} does not exist: set FINETUNE_SPECS or run from the repository root"
        )
    specs, broken = load_specs_report(folder)
    components, names = component_definitions(project_root)
    for s in [s for s in specs if s.name in names]:  # a component keeps its name; the spec file is reported
        specs.remove(s)
        broken[s.path or folder] = [
            f"{s.path}: the name '{s.name}' is taken by the component {names[s.name]}; pipeline names must be unique"
        ]
    return dg.Definitions.merge(
        *[build_pipeline_defs(s) for s in specs],
        *components,
        dg.Definitions(
            assets=spec_error_assets(broken), resources=default_resources(), executor=dg.in_process_executor
        ),
    )


def component_definitions(project_root: Path | None) -> tuple[list[dg.Definitions], dict[str, Path | None]]:
    """The components of the defs folder (dg's own loader) when this package runs from a dg project checkout, and
    the FineTunePipeline names they use (with their defs.yaml)."""
    from finetune_pipeline.defs.component import FineTunePipeline, project_tree

    tree = project_tree(project_root)
    if tree is None:
        return [], {}
    names = {c.spec.name: c.spec.path for c in tree.get_all_components(of_type=FineTunePipeline)}
    return [tree.build_defs()], names


def spec_error_assets(broken: dict[Path, list[str]]) -> list[dg.AssetSpec]:
    """A broken spec must not take the other pipelines down: it is reported as a warning (printed by
    ``dg check defs``) and as an asset ``spec_errors/<file>`` whose description lists the problems."""
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
