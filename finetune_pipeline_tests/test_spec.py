"""Tier 1: spec validation reports every problem at once, with field path and line."""

import json
from pathlib import Path

import pytest

from finetune_pipeline.spec import SpecError, json_schema, load_spec, load_specs, parse_spec

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent

MINIMAL = """
name: demo
source: {incoming_dir: in}
registry: {model_name: demo-model}
"""


def test_bundled_spec_is_valid_and_resolves_paths() -> None:
    s = load_spec(REPO / "specs" / "ticket_triage.yaml")
    assert s.name == "ticket_triage"
    assert s.incoming_dir == (REPO / "data" / "ticket_triage" / "incoming").resolve()
    assert s.spec.model.trust_remote_code is False
    assert len(s.spec_hash) == 16


def test_minimal_spec_gets_documented_defaults() -> None:
    s = parse_spec(MINIMAL).spec
    assert s.model.method == "lora" and s.model.lora.r == 16 and s.model.lora.target_modules == "all-linear"
    assert s.sweep.enabled is False


def test_all_problems_reported_at_once_with_path_and_line() -> None:
    text = """name: bad name
source:
  incoming_dir: in
model:
  method: lora
  lora:
    r: 0
    alpah: 3
training:
  learning_rate: -1
sweep:
  enabled: true
  search_space:
    momentum: {type: float, low: 0.1, high: 0.9}
registry: {model_name: m}
"""
    with pytest.raises(SpecError) as exc:
        parse_spec(text, source="bad.yaml")
    problems = exc.value.problems
    joined = "\n".join(problems)
    assert "bad.yaml:1: name: must start with a letter" in joined
    assert "bad.yaml:7: model.lora.r: must be > 0" in joined
    assert "bad.yaml:8: model.lora.alpah: unknown field" in joined
    assert "bad.yaml:10: training.learning_rate: must be > 0" in joined
    assert "sweep.search_space: unknown parameter(s) ['momentum']" in joined
    assert len(problems) == 5


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("split: {validation_fraction: 0.5, test_fraction: 0.5}", "validation_fraction + test_fraction must be < 1"),
        (
            "evaluation: {metrics: [rouge_l], primary_metric: exact_match}",
            "primary_metric 'exact_match' must be listed",
        ),
        ("sweep: {enabled: true}", "needs a non-empty search_space"),
        (
            "sweep: {search_space: {learning_rate: {type: float, low: 0, high: 1, log: true}}}",
            "log scale needs 'low' > 0",
        ),
        ("model: {method: dora}", "model.method"),
        (
            "split: {validation_fraction: 0}\nsweep: {enabled: true, search_space: {lora.r: {type: categorical, choices: [4]}}}",
            "set split.validation_fraction > 0",
        ),
    ],
)
def test_rule_violations_name_the_field(patch: str, expected: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(MINIMAL + patch + "\n")
    assert expected in str(exc.value)


def test_missing_required_sections_and_bad_yaml() -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec("name: x\n", source="x.yaml")
    assert any("source: required field is missing" in p for p in exc.value.problems)
    assert any("registry: required field is missing" in p for p in exc.value.problems)
    with pytest.raises(SpecError, match="x.yaml:2: not valid YAML"):
        parse_spec("name: x\n  bad: [\n", source="x.yaml")


def test_load_specs_checks_every_file_and_unique_names(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(MINIMAL)
    (tmp_path / "b.yaml").write_text(MINIMAL)
    (tmp_path / "c.yaml").write_text(
        "name: c\nsource: {incoming_dir: in}\nregistry: {model_name: c}\ntraining: {max_steps: 0}\n"
    )
    with pytest.raises(SpecError) as exc:
        load_specs(tmp_path)
    joined = "\n".join(exc.value.problems)
    assert "training.max_steps: must be > 0" in joined
    assert "two specs use the name 'demo'" in joined


def test_committed_json_schema_is_current() -> None:
    committed = json.loads((REPO / "finetune_pipeline" / "spec.schema.json").read_text())
    assert committed == json_schema(), (
        "regenerate: python -m finetune_pipeline.spec schema > finetune_pipeline/spec.schema.json"
    )


def test_every_field_is_documented() -> None:
    schema = json_schema()
    missing = []
    for name, d in [("PipelineSpec", schema), *schema.get("$defs", {}).items()]:
        for field, prop in d.get("properties", {}).items():
            if not prop.get("description"):
                missing.append(f"{name}.{field}")
    assert missing == []


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (
            'name: demo\nsource: {incoming_dir: in}\nregistry: {model_name: m}\nmodel: {base: "abc}\n'
            "training:\n  max_steps: 3\nsweep:\n  enabled: false\nevaluation: {}\n",
            4,
            ["quoted scalar", 'model: {base: "abc}'],
        ),
        ("name: demo\nsource: {incoming_dir: [in}\nregistry: {model_name: m}\n\n\n", 2, ["flow sequence"]),
        ("name: demo\nsource:\n  incoming_dir: in\n   bad: x\nregistry: {model_name: m}\n", 4, ["mapping values"]),
    ],
    ids=["unclosed-quote", "unclosed-bracket", "bad-indent"],
)
def test_yaml_syntax_errors_point_at_their_cause(text: str, line: int, words: list[str]) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec(text, source="s.yaml")
    [problem] = exc.value.problems
    assert problem.startswith(f"s.yaml:{line}: not valid YAML"), problem
    for w in words:
        assert w in problem


def test_duplicate_keys_are_reported_and_later_errors_point_into_the_kept_block() -> None:
    text = MINIMAL + "training:\n  max_steps: 3\nmodel: {method: lora}\ntraining:\n  learning_rate: -1\n"
    with pytest.raises(SpecError) as exc:
        parse_spec(text, source="d.yaml")
    joined = "\n".join(exc.value.problems)
    assert "d.yaml:8: training: duplicate key (also at line 5)" in joined
    assert "d.yaml:9: training.learning_rate: must be > 0" in joined


def test_a_broken_spec_does_not_take_the_others_down(tmp_path: Path) -> None:
    from finetune_pipeline.spec import load_specs_report

    (tmp_path / "a.yaml").write_text(MINIMAL)
    (tmp_path / "b.yaml").write_text('name: b\nsource: {incoming_dir: "in}\n')
    (tmp_path / "c.yaml").write_text(MINIMAL)  # the same name as a.yaml
    specs, broken = load_specs_report(tmp_path)
    assert [s.path.name for s in specs] == ["a.yaml"]  # type: ignore[union-attr]
    assert sorted(p.name for p in broken) == ["b.yaml", "c.yaml"]
    assert "not valid YAML" in broken[tmp_path / "b.yaml"][0]
    assert "two specs use the name 'demo'" in broken[tmp_path / "c.yaml"][0]
    with pytest.raises(SpecError):  # the strict loader still refuses
        load_specs(tmp_path)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ("source: {incoming_dir: in, record_hook: not a hook}", "must be 'module:function'"),
        ("source: {incoming_dir: in, roles: {bing: robot}}", "source.roles.bing"),
        ("source: {incoming_dir: in, leading_assistant: keep}", "source.leading_assistant"),
        ("source: {incoming_dir: in, done_marker: a/b}", "must be a file name"),
    ],
)
def test_new_source_fields_are_validated(patch: str, expected: str) -> None:
    text = "name: demo\nregistry: {model_name: m}\n" + patch + "\n"
    with pytest.raises(SpecError) as exc:
        parse_spec(text)
    assert expected in str(exc.value)


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ("{r: 1024}", "above vLLM's largest --max-lora-rank (512)"),
        ("{target_modules: [q_proj, lm_head]}", "no LoRA on the output head"),
        ("{modules_to_save: [lm_head]}", "modules_to_save"),
        ("{use_dora: true}", "DoRA"),
    ],
)
def test_vllm_target_refuses_what_vllm_cannot_serve(lora: str, reason: str) -> None:
    text = MINIMAL + f"model: {{lora: {lora}}}\nrelease: {{targets: [vllm]}}\n"
    with pytest.raises(SpecError) as err:
        parse_spec(text)
    assert "release.targets includes vllm" in str(err.value) and reason in str(err.value)
    parse_spec(MINIMAL + f"model: {{lora: {lora}}}\n")  # without the vllm target the same adapter is fine


def test_vllm_rank_rounds_up_to_an_accepted_max_lora_rank() -> None:
    from finetune_pipeline.spec import vllm_max_lora_rank

    s = parse_spec(MINIMAL + "model: {lora: {r: 12}}\nrelease: {targets: [vllm], max_drop: 0.01}\n").spec
    assert s.release.max_drop == 0.01 and vllm_max_lora_rank(s.model.lora.r) == 16
    assert vllm_max_lora_rank(512) == 512 and vllm_max_lora_rank(300) == 320
    assert parse_spec(MINIMAL + "model: {method: full, lora: {r: 1024}}\nrelease: {targets: [vllm]}\n")
