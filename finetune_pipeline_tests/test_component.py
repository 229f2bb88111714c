"""Tier 2: the FineTunePipeline component loaded by Dagster's own component machinery (a defs folder sandbox):
the same definitions as a spec file, the same problems with file and line, the scaffolded starter, the schema."""

import json
import re
import sys
import textwrap
from pathlib import Path

import dagster as dg
import jsonschema
import pytest
import yaml
from dagster.components.testing import create_defs_folder_sandbox

from finetune_pipeline.defs.component import FineTunePipeline, attributes_json_schema, defs_yaml_json_schema
from finetune_pipeline.defs.pipeline import build_pipeline_defs
from finetune_pipeline.defs.resources import default_resources
from finetune_pipeline.spec import SpecError, load_spec
from finetune_pipeline_tests.conftest import REPO

pytestmark = pytest.mark.integration

SPEC = """\
name: comp
source: {incoming_dir: incoming, settle_seconds: 0}
model:
  lora: {r: 4, alpha: 8}
sweep:
  enabled: true
  n_trials: 2
  search_space:
    learning_rate: {type: float, low: 0.001, high: 0.01, log: true}
registry: {model_name: comp-model}
automation: {retrain_cron: "0 4 * * *"}
"""
BROKEN = """\
name: comp
source: {incoming_dir: incoming, record_format: chatt}
model:
  lora: {r: 0, alpha: 8}
training:
  max_step: 10
split: {method: stratified}
registry: {model_name: comp-model}
"""


def as_component(spec_text: str) -> str:
    return "type: finetune_pipeline.FineTunePipeline\nattributes:\n" + textwrap.indent(spec_text, "  ")


def summary(defs: dg.Definitions) -> dict:
    graph = defs.resolve_asset_graph()
    return {
        "assets": sorted(k.to_user_string() for k in graph.get_all_asset_keys()),
        "checks": sorted(str(c) for c in graph.asset_check_keys),
        "jobs": sorted(j.name for j in defs.jobs or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
        "schedules": sorted(s.name for s in defs.schedules or []),
        "conditions": sorted(
            (k.to_user_string(), str(graph.get(k).automation_condition)) for k in graph.get_all_asset_keys()
        ),
    }


def problems_without_place(problems: list[str]) -> list[str]:
    return sorted(re.sub(r"^\S+?(:\d+)?: ", "", p) for p in problems)


def test_defs_yaml_builds_what_a_spec_file_builds(tmp_path: Path) -> None:
    (tmp_path / "comp.yaml").write_text(SPEC)
    plain = build_pipeline_defs(load_spec(tmp_path / "comp.yaml"))
    expected = summary(dg.Definitions.merge(plain, dg.Definitions(resources=default_resources())))
    with create_defs_folder_sandbox() as sandbox:
        for name, body in [("inline", as_component(SPEC)), ("by_path", None)]:
            folder = sandbox.defs_folder_path / name
            folder.mkdir()
            if body is None:  # spec_path: a spec file next to the component, the same file format as specs/
                (folder / "comp.yaml").write_text(SPEC)
                body = "type: finetune_pipeline.FineTunePipeline\nattributes: {spec_path: comp.yaml}\n"
            (folder / "defs.yaml").write_text(body)
            with sandbox.load_component_and_build_defs(defs_path=folder) as (component, defs):
                assert isinstance(component, FineTunePipeline)
                assert summary(defs) == expected
                # relative paths resolve against the component's folder, as a spec's do against its file
                assert component.spec.incoming_dir == (folder / "incoming").resolve()
                assert component.spec.spec_hash == load_spec(tmp_path / "comp.yaml").spec_hash
    assert "comp_train" in expected["jobs"] and "comp_retrain_schedule" in expected["schedules"]
    assert "comp/hyperparameter_sweep" in expected["assets"]


def test_broken_attributes_report_the_spec_checks_problems_with_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(BROKEN)
    with pytest.raises(SpecError) as from_file:
        load_spec(tmp_path / "bad.yaml")
    with create_defs_folder_sandbox() as sandbox:
        folder = sandbox.defs_folder_path / "bad"
        folder.mkdir()
        (folder / "defs.yaml").write_text(as_component(BROKEN))
        with pytest.raises(Exception) as from_component:
            with sandbox.load_component_and_build_defs(defs_path=folder):
                pass
    err = from_component.value
    while err is not None and not isinstance(err, SpecError):  # dagster wraps the load error
        err = err.__cause__ or err.__context__
    assert isinstance(err, SpecError), from_component.value
    assert problems_without_place(err.problems) == problems_without_place(from_file.value.problems)
    lines = {p.split(": ")[1]: p.split(": ")[0] for p in err.problems}
    # two lines further down than in the spec file: `type:` and `attributes:` come first
    assert lines["model.lora.r"].endswith("defs.yaml:6") and lines["training.max_step"].endswith("defs.yaml:8")
    assert lines["source.record_format"].endswith("defs.yaml:4")


def test_attributes_schema_is_the_spec_schema_and_names_the_field(tmp_path: Path) -> None:
    schema = attributes_json_schema()
    v = jsonschema.Draft202012Validator(schema)
    demo = yaml.safe_load((REPO / "specs" / "ticket_triage.yaml").read_text())
    assert list(v.iter_errors(demo)) == []
    assert list(v.iter_errors({"spec_path": "../../specs/ticket_triage.yaml"})) == []
    errors = {tuple(e.absolute_path): e.message for e in v.iter_errors(yaml.safe_load(BROKEN))}
    assert errors[("model", "lora", "r")] == "0 is less than or equal to the minimum of 0"
    assert "'chatt' is not one of" in errors[("source", "record_format")]
    assert "'max_step' was unexpected" in errors[("training",)]
    assert "'registry' is a required property" in [e.message for e in v.iter_errors({"name": "x", "source": {}})]
    assert list(v.iter_errors({"spec_path": "x.yaml", "name": "x"}))  # one or the other
    # what dg reads for `dg check yaml` and editor completion
    assert FineTunePipeline.get_model_cls().model_json_schema() == schema
    assert set(schema["properties"]) - {"spec_path"} == set(load_spec_fields())


def load_spec_fields() -> list[str]:
    from finetune_pipeline.spec import PipelineSpec

    return list(PipelineSpec.model_fields)


def test_scaffolded_starter_passes_the_spec_validation() -> None:
    with create_defs_folder_sandbox() as sandbox:
        folder = sandbox.scaffold_component(component_cls=FineTunePipeline, defs_path="my_pipeline")
        text = (folder / "defs.yaml").read_text()
        assert "\ntype: finetune_pipeline.FineTunePipeline\n" in text
        # the modeline names the committed defs.yaml schema, relative to the new folder (editor completion)
        modeline = text.splitlines()[0].split("$schema=")[1]
        assert (folder / modeline).resolve() == REPO / "finetune_pipeline" / "component.schema.json"
        validator = jsonschema.Draft202012Validator(json.loads((folder / modeline).read_text()))
        assert list(validator.iter_errors(yaml.safe_load(text))) == []
        broken = yaml.safe_load(text.replace("r: 8", "r: 0"))
        assert [list(e.absolute_path) for e in validator.iter_errors(broken)] == [["attributes", "model", "lora", "r"]]
        with sandbox.load_component_and_build_defs(defs_path=folder) as (component, defs):
            assert component.spec.name == "my_pipeline"
            assert component.spec.registry.model_name == "my-pipeline"
            assert {"my_pipeline_ingest", "my_pipeline_train"} <= {j.name for j in defs.jobs or []}
            assert component.spec.incoming_dir == (sandbox.project_root / "data" / "ticket_triage" / "incoming")


def test_code_location_loads_specs_and_components_and_reports_a_name_taken_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune_pipeline.definitions import build_definitions

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "comp.yaml").write_text(SPEC)
    (specs / "other.yaml").write_text(SPEC.replace("name: comp", "name: other"))
    with create_defs_folder_sandbox() as sandbox:
        folder = sandbox.defs_folder_path / "comp"
        folder.mkdir()
        (folder / "defs.yaml").write_text(as_component(SPEC))
        monkeypatch.syspath_prepend(str(sandbox.project_root / "src"))
        with pytest.warns(UserWarning, match="the name 'comp' is taken by the component"):
            defs = build_definitions(specs, project_root=sandbox.project_root)
        keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
        for name in [m for m in sys.modules if m.startswith(sandbox.project_name)]:
            del sys.modules[name]
    assert {"comp/adapter", "other/adapter", "spec_errors/comp"} <= keys
    comp_sensor = next(s for s in defs.sensors or [] if s.name == "comp_incoming_sensor")
    assert str(folder / "incoming") in (comp_sensor.description or "")  # the component's, not the spec file's


def test_committed_defs_yaml_schema_is_current() -> None:
    committed = json.loads((REPO / "finetune_pipeline" / "component.schema.json").read_text())
    assert committed == defs_yaml_json_schema(), (
        "regenerate: python -m finetune_pipeline.defs.component > finetune_pipeline/component.schema.json"
    )


def test_component_is_importable_from_the_package_root_without_dagster_or_torch() -> None:
    import subprocess

    code = (
        "import sys, finetune_pipeline as f; assert 'dagster' not in sys.modules; "
        "assert 'FineTunePipeline' in dir(f); c = f.FineTunePipeline; "
        "import finetune_pipeline.definitions; assert 'torch' not in sys.modules, 'torch imported'; print(c.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "FineTunePipeline", out.stderr[-2000:]
