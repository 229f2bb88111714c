"""Integration tier: the data assets (defs/data_assets.py) in a real Dagster run: data_readiness's blocking checks
stop the training assets downstream."""

import pytest

pytestmark = pytest.mark.integration


def _dagster_world(tmp_path, tiny_model, extra: str):  # type: ignore[no-untyped-def]
    """Spec 'rd' on the tiny model with 40 rows already split (32/4/4) and the base model recorded; its resources."""
    import json

    from finetune_pipeline.spec import parse_spec
    from finetune_pipeline_tests.conftest import chat_row, local_resources, prepared_splits

    spec = parse_spec(
        f"name: rd\nsource: {{incoming_dir: in}}\nregistry: {{model_name: m}}\n"
        f"model: {{base: {tiny_model}, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}\n{extra}",
        path=tmp_path / "rd.yaml",
    )
    messages = [json.dumps(chat_row(i)["messages"]) for i in range(40)]
    layout = prepared_splits(tmp_path, "rd", tiny_model, messages, 32, 4)
    return spec, layout, local_resources(tmp_path)


def test_unmet_spec_minimums_stop_the_adapter_in_a_dagster_run(tmp_path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """data_readiness and the adapter in one run with split.min_train_rows above the training rows: the
    blocking check fails with what to do, and the adapter step never starts (nothing trained, nothing written)."""
    import dagster as dg

    from finetune_pipeline.defs.data_assets import data_readiness_asset
    from finetune_pipeline.defs.training_assets import adapter_asset

    extra = "split: {min_train_rows: 500}\ntraining: {max_steps: 2, per_device_train_batch_size: 4, max_length: 96}\n"
    spec, layout, resources = _dagster_world(tmp_path, tiny_model, extra)
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        res = dg.materialize(
            [data_readiness_asset(spec), adapter_asset(spec)],
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert not res.success
        check = next(e for e in res.get_asset_check_evaluations() if e.check_name == "spec_minimums")
        assert not check.passed
        assert "split.min_train_rows=500" in check.description and "drop more data" in check.description
        assert instance.get_latest_materialization_event(dg.AssetKey(["rd", "data_readiness"])) is not None
        assert instance.get_latest_materialization_event(dg.AssetKey(["rd", "adapter"])) is None
        steps = {(e.step_key, e.event_type_value) for e in res.all_events if e.step_key}
        assert ("rd__data_readiness", "STEP_FAILURE") in steps  # a failed blocking check fails its step
        assert not {k for k, _ in steps} & {"rd__adapter"}, "the adapter step never started"
    assert not layout.adapters.exists() or not any(layout.adapters.iterdir())


BROKEN_TEMPLATE = (  # ChatML whose generation block leaves out <|im_end|>: the model would never learn to stop
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("template", ["auto", "broken.jinja"])
def test_end_of_turn_contract_is_a_blocking_check_before_training(tmp_path, tiny_model, template: str) -> None:  # type: ignore[no-untyped-def]
    """Tier 2: token_stats checks the tokenised training rows; a template whose generation block leaves out the
    end-of-turn token fails the blocking check (share and one row shown), and readiness and the adapter never run."""
    import dagster as dg

    from finetune_pipeline.defs.data_assets import data_readiness_asset, token_stats_asset
    from finetune_pipeline.defs.training_assets import adapter_asset

    (tmp_path / "broken.jinja").write_text(BROKEN_TEMPLATE)
    extra = f"training: {{max_steps: 1, per_device_train_batch_size: 4, max_length: 96, chat_template: {template}}}\n"
    spec, _, resources = _dagster_world(tmp_path, tiny_model, extra)
    assets = [token_stats_asset(spec)] + (
        [data_readiness_asset(spec), adapter_asset(spec)] if template != "auto" else []
    )
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        res = dg.materialize(assets, instance=instance, resources=resources, raise_on_error=False)
        check = next(e for e in res.get_asset_check_evaluations() if e.check_name == "end_of_turn_contract")
        meta = {k: v.value for k, v in check.metadata.items()}
        if template == "auto":
            assert res.success and check.passed and meta["rows"] == 32 and meta["failing_rows"] == 0
            return
        assert not res.success and not check.passed
        assert "32 of 32 training rows (100.0%)" in check.description and "training.chat_template" in check.description
        assert meta["share_failing"] == 1.0 and meta["example"]["row"] == "r0"
        steps = {(e.step_key, e.event_type_value) for e in res.all_events if e.step_key}
        assert ("rd__token_stats", "STEP_FAILURE") in steps  # a failed blocking check fails its step
        assert not {k for k, _ in steps} & {"rd__data_readiness", "rd__adapter"}, "nothing downstream started"
