"""Tier 2: training when the disk fills or a checkpoint is damaged, on the real trainer with a tiny model. The full
disk is a real small filesystem (tmpfs with a size, mounted by the test as root), never a patched write."""

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
from finetune_pipeline.training.checkpoints import COMPLETE, DiskFull, checkpoint_problem, last_usable_checkpoint
from finetune_pipeline_tests.conftest import chat_row

pytestmark = pytest.mark.integration


def _request(base: Path, out: Path, ckpt: Path, steps: int = 3):  # type: ignore[no-untyped-def]
    from finetune_pipeline.training.sft import TrainRequest

    return TrainRequest(
        base_path=str(base),
        model=ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0}),
        training=TrainingSpec(max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3, max_length=96),
        runtime=RuntimeSpec(logging_steps=1, save_steps=1, calibration_steps=0, eos_check_samples=0),
        train_messages=[json.dumps(chat_row(i)["messages"]) for i in range(12)],
        eval_messages=[],
        output_dir=out,
        checkpoint_dir=ckpt,
    )


def _train(req, logs: list[str]):  # type: ignore[no-untyped-def]
    from finetune_pipeline.training.sft import train

    return train(req, log=logs.append)


def _mount_problem() -> str | None:
    if os.geteuid() != 0:
        return "mounting a small tmpfs needs root (the disk-full tests make a real small filesystem)"
    probe = Path(f"/tmp/finetune-mount-probe-{uuid.uuid4().hex[:8]}")
    probe.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if r.returncode != 0:
            return f"mount -t tmpfs is refused here: {r.stderr.decode().strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``mount(size)`` mounts (or resizes) a tmpfs of that size at tmp_path/small and returns its path."""
    why = _mount_problem()
    if why:
        print(f"SKIP disk-full test: {why}")
        pytest.skip(why)
    point = tmp_path / "small"
    point.mkdir()
    mounted = []

    def mount(size: str) -> Path:
        opts = f"size={size}" + (",remount" if mounted else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], check=True)
        mounted.append(size)
        return point

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_truncated_last_checkpoint_is_skipped_for_the_one_before(tiny_model: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _train(_request(tiny_model, tmp_path / "out", ckpt, steps=2), [])
    # the trainer deletes its checkpoints only through the adapter stage: both are here, marked complete
    assert all((ckpt / f"checkpoint-{n}" / COMPLETE).exists() for n in (1, 2))
    damaged = ckpt / "checkpoint-2" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    assert "truncated" in str(checkpoint_problem(ckpt / "checkpoint-2"))
    logs: list[str] = []
    res = _train(_request(tiny_model, tmp_path / "out", ckpt, steps=2), logs)
    skipped = [m for m in logs if m.startswith("skipping checkpoint")]
    assert skipped and "checkpoint-2" in skipped[0] and "adapter_model.safetensors" in skipped[0]
    assert "truncated" in skipped[0]
    assert res.resumed_from_step == 1 and res.steps == 2  # resumed from checkpoint-1 and trained step 2 again
    assert checkpoint_problem(ckpt / "checkpoint-2") is None  # rewritten whole


def test_disk_full_while_checkpointing_keeps_the_last_good_one_and_resumes(
    tiny_model: Path, tmp_path: Path, small_disk
) -> None:  # type: ignore[no-untyped-def]
    """A filesystem with room for one checkpoint (each holds the ~3.5 MB tokenizer): the second save fails."""
    ckpt = small_disk("5m") / "ckpt"
    req = _request(tiny_model, tmp_path / "out", ckpt, steps=3)
    with pytest.raises(DiskFull) as exc:
        _train(req, [])
    msg = str(exc.value)
    assert "no space left on device" in msg and str(ckpt) in msg and "checkpoint-1 is intact" in msg
    assert "materialize the adapter again" in msg
    assert checkpoint_problem(ckpt / "checkpoint-1") is None  # the last good checkpoint reads back whole
    assert last_usable_checkpoint(ckpt, remove=False) == ckpt / "checkpoint-1"
    small_disk("64m")  # space is back
    logs: list[str] = []
    res = _train(req, logs)
    assert res.resumed_from_step == 1 and res.steps == 3
    assert any("resuming from checkpoint-1" in m for m in logs)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_disk_full_while_writing_the_adapter_resumes_from_the_last_step(
    tiny_model: Path, tmp_path: Path, small_disk
) -> None:  # type: ignore[no-untyped-def]
    """The checkpoints fit, the adapter's folder (tokenizer included) does not: the checkpoint of the last step is
    kept and the rerun only loads and saves it."""
    out = small_disk("1m") / "out"
    req = _request(tiny_model, out, tmp_path / "ckpt", steps=2)
    with pytest.raises(DiskFull) as exc:
        _train(req, [])
    assert str(out) in str(exc.value) and "checkpoint-2 is intact" in str(exc.value)
    small_disk("64m")
    logs: list[str] = []
    res = _train(req, logs)
    assert res.resumed_from_step == 2 and res.steps == 2
    assert any("is the last step: loaded its weights" in m for m in logs)
    assert checkpoint_problem(tmp_path / "ckpt" / "checkpoint-2") is None
    from safetensors.torch import load_file

    trained = load_file(out / "adapter_model.safetensors")
    kept = load_file(tmp_path / "ckpt" / "checkpoint-2" / "adapter_model.safetensors")
    assert trained.keys() == kept.keys() and all((trained[k] == kept[k]).all() for k in kept)
    shutil.rmtree(out)
