"""Tier 2: the adapter asset trains in a real child process (Dagster Pipes) against a real SQLite Dagster instance
and a real MLflow store: kill -9 mid-run and resume from the checkpoint, identical weights from identical runs
(one of them under `accelerate launch`), and the cost and reproducibility record."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from safetensors.torch import load_file

from finetune_pipeline.defs.resources import MlflowTracking, OptunaStorage, StateStore
from finetune_pipeline.defs.training_assets import build_training_assets
from finetune_pipeline.layout import AdapterRecord, PipelineLayout
from finetune_pipeline.spec import parse_spec
from finetune_pipeline_tests.conftest import chat_row, prepared_splits

pytestmark = pytest.mark.integration

MAX_STEPS = 12
# float32: on every CPU the same dtype, and the one where another thread count or order would change the bits
SPEC = """
name: kid
source: {{incoming_dir: in}}
model: {{base: {model}, method: lora, dtype: float32, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
training: {{max_steps: {steps}, per_device_train_batch_size: 2, learning_rate: 0.005, max_length: 96,
           max_eval_samples: 4, seed: 3}}
runtime: {{logging_steps: 2, save_steps: 2, save_total_limit: 2, eos_check_samples: 2, calibration_steps: 2,
          launcher: {launcher}}}
evaluation: {{max_new_tokens: 4}}
registry: {{model_name: kid-model}}
"""


class World:
    def __init__(self, tmp: Path, tiny_model: Path, launcher: str = "python") -> None:
        self.root = tmp / "state"
        prepared_splits(tmp, "kid", None, [json.dumps(chat_row(i)["messages"]) for i in range(40)], 32, 4)
        (tmp / "specs").mkdir(parents=True, exist_ok=True)
        spec_file = tmp / "specs" / "kid.yaml"
        spec_file.write_text(SPEC.format(model=tiny_model, steps=MAX_STEPS, launcher=launcher))
        self.spec = parse_spec(spec_file.read_text(), path=spec_file)
        self.assets = build_training_assets(self.spec)
        self.resources = {
            "state": StateStore(root=str(self.root)),
            "mlflow_tracking": MlflowTracking(tracking_uri=f"sqlite:///{self.root / 'mlflow.db'}"),
            "optuna": OptunaStorage(),
        }
        (tmp / "dagster").mkdir(exist_ok=True)
        self.dagster_dir = tmp / "dagster"

    def materialize(self, instance: dg.DagsterInstance) -> dg.ExecuteInJobResult:
        return dg.materialize(self.assets, instance=instance, resources=self.resources, raise_on_error=False)

    def adapters(self) -> Path:
        return PipelineLayout(self.root, "kid").adapters

    def meta(self, instance: dg.DagsterInstance) -> dict:
        ev = instance.get_latest_materialization_event(dg.AssetKey(["kid", "adapter"]))
        return {k: v.value for k, v in ev.asset_materialization.metadata.items()}


def _complete_steps(work: Path) -> list[int]:
    return sorted(int(c.parent.name.split("-")[1]) for c in work.glob("checkpoints/checkpoint-*/CHECKPOINT_COMPLETE"))


def _order(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    """Two uninterrupted runs of the same spec and data, in two state roots; the second under accelerate launch."""
    out = {}
    for launcher in ("python", "accelerate"):
        tmp = tmp_path_factory.mktemp(f"ref-{launcher}")
        w = World(tmp, tiny_model, launcher)
        with dg.instance_for_test(temp_dir=str(w.dagster_dir)) as inst:
            res = w.materialize(inst)
            assert res.success
            meta = w.meta(inst)
            logs = [
                e.message
                for e in inst.all_logs(res.run_id)
                if e.is_dagster_event is False and e.message and "step" in e.message
            ]
        out[launcher] = {"world": w, "meta": meta, "dir": Path(meta["path"]), "logs": logs}
    return out


def test_two_identical_runs_give_identical_adapter_weights(reference: dict) -> None:
    a, b = (load_file(reference[k]["dir"] / "adapter_model.safetensors") for k in ("python", "accelerate"))
    assert a and a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    ra, rb = (
        AdapterRecord.load(reference[k]["dir"] / "adapter.json").reproducibility_record()
        for k in ("python", "accelerate")
    )
    # same seeds, versions, data and base weights; the spec hashes differ by the launcher only
    same = ("seeds", "libraries", "data_digests", "splits_version", "base_weights_digest", "code_version")
    assert {k: ra[k] for k in same} == {k: rb[k] for k in same} and ra["adapter_key"] == rb["adapter_key"]
    # both launchers start the child with the same CPU threads (in float32 another count changes the last bits)
    assert ra["hardware"] == rb["hardware"] and ra["hardware"]["torch_threads"] >= 1
    assert ra["seeds"]["adapter_init_seed"] == 3 and ra["libraries"]["torch"].startswith("2.13")
    assert ra["data_digests"]["train"] and ra["spec_hash"] and ra["hardware"]["cpu_count"] >= 1
    assert _order(reference["python"]["dir"] / "data_order.jsonl") == _order(
        reference["accelerate"]["dir"] / "data_order.jsonl"
    )


def test_child_streams_progress_and_reports_cost(reference: dict) -> None:
    import mlflow

    ref = reference["python"]
    meta = ref["meta"]
    # progress lines from the child reached the Dagster run log while it trained (Pipes log messages)
    assert any(f"step {MAX_STEPS}/{MAX_STEPS} loss" in m for m in ref["logs"])
    assert any(m.startswith("calibration:") for m in ref["logs"])
    assert meta["steps"] == MAX_STEPS and meta["resumed_from_step"] == 0 and meta["reused"] is False
    assert meta["tokens_per_second"] > 0 and meta["train_tokens"] > 0 and meta["peak_memory_mb"] > 100
    assert meta["estimated_seconds"] > 0 and meta["wall_seconds"] > 0 and meta["trainable_params"] > 0
    assert 0 < meta["flop_utilisation"] < 1 and meta["matmul_peak_tflops"] > 0
    assert meta["chat_template"] == "chatml-smollm2" and meta["eos_token"] == "<|im_end|>"
    assert "loss_curve" in meta and meta["reproducibility"]["spec_hash"]
    # the chat template and EOS token travel with the adapter
    template = (ref["dir"] / "chat_template.jinja").read_text()
    assert "{% generation %}" in template
    assert json.loads((ref["dir"] / "generation_config.json").read_text())["eos_token_id"] == 2
    # the same figures and the reproducibility record are in MLflow
    w = ref["world"]
    run = mlflow.MlflowClient(tracking_uri=f"sqlite:///{w.root / 'mlflow.db'}").get_run(meta["mlflow_run_id"])
    assert run.data.metrics["tokens_per_second"] > 0 and "flop_utilisation" in run.data.metrics
    assert run.data.tags["repro.seeds.adapter_init_seed"] == "3"
    assert run.data.tags["repro.libraries.trl"].startswith("1.16")
    assert run.data.tags["repro.data_digests.train"] == meta["reproducibility"]["data_digests"]["train"]
    assert not list((w.adapters()).glob("*.partial")), "checkpoints are cleaned up after a finished run"


def test_killed_child_resumes_from_its_checkpoint(tmp_path: Path, tiny_model: Path, reference: dict) -> None:
    w = World(tmp_path, tiny_model)
    with dg.instance_for_test(temp_dir=str(w.dagster_dir)) as inst:
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(res=w.materialize(inst)))
        th.start()
        deadline = time.time() + 240
        work = None
        while time.time() < deadline:
            work = next(iter(w.adapters().glob("*.partial")), None) if w.adapters().exists() else None
            if (
                work is not None
                and (work / "child.pid").exists()
                and len(_complete_steps(work))
                and max(_complete_steps(work)) >= 4
            ):
                break
            assert th.is_alive(), "the run ended before it could be killed"
            time.sleep(0.02)
        assert work is not None
        pid = int((work / "child.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        th.join(timeout=120)
        assert box["res"].success is False
        killed_at = max(_complete_steps(work))
        assert 4 <= killed_at < MAX_STEPS
        assert not (work / "adapter_model.safetensors").exists()

        res = w.materialize(inst)
        assert res.success
        meta = w.meta(inst)
    # the second materialization continued from the checkpoint's global step instead of starting over
    assert meta["resumed_from_step"] == killed_at and meta["steps"] == MAX_STEPS
    done = Path(meta["path"])
    order = _order(done / "data_order.jsonl")
    resumed = [o for o in order if o["resumed_from"] == killed_at]
    first = [o for o in order if o["resumed_from"] == 0]
    assert [o["step"] for o in resumed] == list(range(killed_at + 1, MAX_STEPS + 1))
    assert first[0]["step"] == 1 and first[-1]["step"] >= killed_at
    # same data order: the resumed steps saw exactly the batches of an uninterrupted run, step for step
    ref_order = {o["step"]: o["batch"] for o in _order(reference["python"]["dir"] / "data_order.jsonl")}
    assert all(ref_order[o["step"]] == o["batch"] for o in order)
    # and ended with the uninterrupted run's adapter weights
    a = load_file(done / "adapter_model.safetensors")
    b = load_file(reference["python"]["dir"] / "adapter_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
