"""The ``FineTunePipeline`` Dagster Component: a ``defs.yaml`` in the project's defs folder whose attributes are a
pipeline spec (or ``spec_path``, a spec file) builds the same definitions as a file in ``specs/``.

```yaml
type: finetune_pipeline.FineTunePipeline
attributes:          # exactly the spec's fields (finetune_pipeline/spec.py), or {spec_path: ../../specs/x.yaml}
  name: my_pipeline
  source: {incoming_dir: incoming}     # relative paths: relative to this defs.yaml's folder
  registry: {model_name: my-pipeline}
```

One spec model: the attributes' JSON schema (``dg check yaml``, editor completion) is the spec's own JSON schema,
and loading validates them with the spec's own validation, reporting every problem as ``file:line: field: message``
just as ``python -m finetune_pipeline.spec check`` does. New pipeline: ``dg scaffold defs
finetune_pipeline.FineTunePipeline my_pipeline``.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import BaseModel, ConfigDict, Field

from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.paths import PROJECT_ROOT
from finetune_pipeline.spec import LoadedSpec, PipelineSpec, SpecError, load_spec, validate_spec_data

TYPE_NAME = "finetune_pipeline.FineTunePipeline"  # the public name (the package root imports it lazily)
SPEC_PATH_HELP = (
    "A spec file (YAML, the same format as specs/*.yaml), relative to this defs.yaml's folder; "
    "instead of giving the spec's fields here."
)


def attributes_json_schema() -> dict[str, Any]:
    """The spec's JSON schema plus ``spec_path``: either a spec file alone, or the spec's fields (name and
    registry required). ``X | None`` sections become "null, or else X", so ``dg check yaml`` reports a bad nested
    value by its own field and line rather than "not valid under any of the given schemas"."""
    schema = _null_else(copy.deepcopy(PipelineSpec.model_json_schema()))
    schema["properties"]["spec_path"] = {"type": "string", "title": "Spec Path", "description": SPEC_PATH_HELP}
    required = schema.pop("required", [])
    schema["if"] = {"required": ["spec_path"]}
    schema["then"] = {"maxProperties": 1, "description": "spec_path alone: the spec's fields are in that file"}
    schema["else"] = {"required": required}
    schema["title"] = "FineTunePipeline attributes: a fine-tuning pipeline spec"
    return schema


def defs_yaml_json_schema() -> dict[str, Any]:
    """JSON schema of a whole defs.yaml (``type`` + ``attributes``): committed as component.schema.json, which the
    scaffolded defs.yaml names in its yaml-language-server modeline for editor completion."""
    attributes = attributes_json_schema()
    defs = attributes.pop("$defs", {})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "defs.yaml of a FineTunePipeline component",
        "type": "object",
        "properties": {
            "type": {"const": TYPE_NAME, "description": "The component type."},
            "attributes": attributes,
            "requirements": {"type": "object"},
            "post_processing": {"type": "object"},
        },
        "required": ["type", "attributes"],
        "additionalProperties": False,
        "$defs": defs,
    }


SCHEMA_FILE = Path(__file__).resolve().parent.parent / "component.schema.json"


def _null_else(node: Any) -> Any:
    if isinstance(node, dict):
        any_of = node.get("anyOf")
        if isinstance(any_of, list) and len(any_of) == 2 and {"type": "null"} in any_of:
            other = next(s for s in any_of if s != {"type": "null"})
            if "$ref" in other or other.get("type") in ("object", "array"):
                rest = {k: v for k, v in node.items() if k != "anyOf"}
                return {**_null_else(rest), "if": {"type": "null"}, "else": _null_else(other)}
        return {k: _null_else(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_null_else(v) for v in node]
    return node


class FineTunePipelineAttributes(BaseModel):
    """The attributes as written; validated by the spec itself when the component loads (one spec model)."""

    model_config = ConfigDict(extra="allow")
    spec_path: str | None = Field(None, description=SPEC_PATH_HELP)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return attributes_json_schema()


def _line_finder(context: dg.ComponentLoadContext) -> tuple[str, Any]:
    """(file, line_of) for field paths under ``attributes`` of the component's YAML."""
    tree = context.resolution_context.source_position_tree
    source = tree.position.filename if tree is not None else str(context.path / "defs.yaml")

    def line_of(loc: tuple[Any, ...]) -> int | None:
        if tree is None:
            return None
        pos, _ = tree.lookup_closest_and_path(["attributes", *loc], None)
        return pos.start.line

    return source, line_of


class FineTunePipelineScaffolder(dg.Scaffolder):
    """``dg scaffold defs finetune_pipeline.FineTunePipeline NAME``: a starter spec that passes the checks and runs
    on the bundled demo data (a short LoRA run of the packaged SmolLM2, no sweep)."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        target = request.target_path
        target.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"\W", "_", target.name)
        name = name if re.match(r"[A-Za-z]", name) else f"p_{name}"
        root = request.project_root or Path.cwd()
        data = _relpath(root / "data" / "ticket_triage" / "incoming", target)
        (target / "defs.yaml").write_text(starter_yaml(TYPE_NAME, name, data, _relpath(SCHEMA_FILE, target)))


def _relpath(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def starter_yaml(type_name: str, name: str, incoming: str, schema: str) -> str:
    return f"""\
# yaml-language-server: $schema={schema}
# A fine-tuning pipeline as a Dagster component. The attributes are a pipeline spec: every field is documented in
# finetune_pipeline/spec.py; the schema above gives completion in editors with the YAML language server.
# Check: dg check yaml && dg check defs. Run: dg launch --job {name}_train (after ingesting a drop).
type: {type_name}
attributes:
  name: {name}
  description: Starter pipeline, scaffolded by dg; trains on the bundled demo tickets.
  source:
    incoming_dir: {incoming}   # relative to this file
    file_glob: "*.jsonl"
    record_format: chat
    settle_seconds: 2
  model:
    base: smollm2-135m-instruct   # packaged, offline; or a local folder, or a hub id
    method: lora
    lora: {{r: 8, alpha: 16}}
  training:
    max_steps: 10
    max_minutes: 4
    per_device_train_batch_size: 8
    learning_rate: 0.001
    max_length: 256
  sweep:
    enabled: false
  evaluation:
    metrics: [exact_match, json_valid, rouge_l, perplexity]
    primary_metric: json_valid
    max_samples: 32
    max_new_tokens: 48
  registry:
    model_name: {name.replace("_", "-")}
    min_improvement_over_base: 0.0
  automation:
    mode: sensor_schedule   # or declarative: AutomationConditions instead of the sensor's runs and the schedule
    retrain_cron: "0 3 * * *"
"""


@dg.scaffold_with(FineTunePipelineScaffolder)
class FineTunePipeline(dg.Component):
    """A declarative LLM fine-tuning pipeline (finetune_pipeline): the attributes are the pipeline spec, or
    ``spec_path`` to a spec file. Builds the prefixed asset group (raw_dataset ... registered_model) with its
    checks, the NAME_ingest and NAME_train jobs, the incoming sensor and the retraining schedule (or declarative
    automation)."""

    def __init__(self, spec: LoadedSpec):
        self.spec = spec

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return FineTunePipelineAttributes

    @classmethod
    def load(cls, attributes: BaseModel | None, context: dg.ComponentLoadContext) -> FineTunePipeline:
        source, line_of = _line_finder(context)
        if attributes is None:
            raise SpecError(source, [f"{source}: attributes: required (the pipeline spec, or spec_path)"])
        assert isinstance(attributes, FineTunePipelineAttributes)
        fields = dict(attributes.model_extra or {})
        if attributes.spec_path is not None:
            if fields:
                raise SpecError(
                    source,
                    [
                        f"{source}:{line_of(('spec_path',))}: spec_path: give either spec_path or the spec's fields "
                        f"(found also {sorted(fields)}): move them into the spec file"
                    ],
                )
            p = Path(attributes.spec_path).expanduser()
            return cls(load_spec(p if p.is_absolute() else context.path / p))
        spec = validate_spec_data(fields, source, line_of)
        return cls(LoadedSpec(spec=spec, path=Path(source).resolve()))

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        return dg.Definitions.merge(build_pipeline_defs(self.spec), dg.Definitions(resources=default_resources()))


def project_tree(project_root: Path | None = PROJECT_ROOT) -> dg.ComponentTree | None:
    """The component tree of a dg project's defs folder (None where project_root is no dg project)."""
    if project_root is None or not any((project_root / f).is_file() for f in ("pyproject.toml", "dg.toml")):
        return None
    return dg.ComponentTree.for_project(path_within_project=project_root)


def component_specs(project_root: Path | None = PROJECT_ROOT) -> list[LoadedSpec]:
    """The specs of the FineTunePipeline components in a dg project's defs folder (register-drops reads them, as
    the sensor does)."""
    tree = project_tree(project_root)
    return [c.spec for c in tree.get_all_components(of_type=FineTunePipeline)] if tree else []


if __name__ == "__main__":  # python -m finetune_pipeline.defs.component > finetune_pipeline/component.schema.json
    import json

    print(json.dumps(defs_yaml_json_schema(), indent=2))
