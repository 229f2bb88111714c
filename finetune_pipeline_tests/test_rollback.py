"""Manual promote / rollback (stages/register.py, `finetune-pipeline promote|rollback`): the champion's history is
kept, and a version whose registry copy failed its reload check loses its aliases and cannot be promoted."""

import shutil
from pathlib import Path

import pytest

from finetune_pipeline.tracking.mlflow_store import RELOAD_TAG
from finetune_pipeline_tests.test_promotion import _adapter, _eval_and_register, _record, _world

pytestmark = pytest.mark.integration


def test_promote_rollback_history_and_unverified_versions(tmp_path: Path, tiny_model: Path) -> None:
    from mlflow import MlflowClient

    from finetune_pipeline.stages.register import AliasRefused, promote_version, register, rollback

    spec, layout, train, tracker, lin = _world(tmp_path, tiny_model)
    _adapter(layout, spec, train, "champ", lr=5e-3)
    _, first = _eval_and_register(layout, spec, "champ", tracker, lin)
    shutil.copytree(layout.adapter("champ"), layout.adapter("copy"))
    _record(layout, spec, "copy", layout.adapter("copy"))
    out, second = _eval_and_register(layout, spec, "copy", tracker, lin)
    name = spec.registry.model_name
    client = MlflowClient(tracking_uri=tracker.target.tracking_uri, registry_uri=tracker.target.tracking_uri)
    assert not second.promoted and second.aliases == ["challenger"]

    prev = promote_version(tracker, name, second.version, "ops decision")
    assert prev == first.version
    assert str(client.get_model_version_by_alias(name, "champion").version) == second.version
    assert str(client.get_model_version_by_alias(name, "previous-champion").version) == first.version
    assert rollback(tracker, name, "bad answers in production") == (second.version, first.version)
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.version
    history = tracker.champion_history(name)
    assert [h["version"] for h in history] == [first.version, second.version, first.version]
    assert "rollback from v2: bad answers in production" in history[-1]["reason"]

    # a version whose registry copy does not reproduce the trained logits loses its aliases and cannot be promoted
    client.set_model_version_tag(name, second.version, RELOAD_TAG, "1.0")
    again = register(layout, spec, out.record.eval_key, tracker, lin, log=lambda m: None)
    assert again.aliases == [] and "reload check failed" in again.reason
    aliases = dict(client.get_registered_model(name).aliases)
    assert second.version not in {str(aliases.get(a)) for a in ("challenger", "champion")}
    with pytest.raises(AliasRefused, match="reload_same_logits"):
        promote_version(tracker, name, second.version, "try")
