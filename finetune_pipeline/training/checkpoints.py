"""Checkpoints of a training run: the last complete one (half-written ones are removed), the tokens it had seen, and
loading one written at the run's last step. Heavy imports stay inside the functions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finetune_pipeline.training.records import COMPLETE


def last_complete_checkpoint(folder: Path | None) -> Path | None:
    """The newest ``checkpoint-N`` folder holding the completion marker; half-written ones are removed."""
    if folder is None or not folder.is_dir():
        return None
    found = []
    for d in folder.glob("checkpoint-*"):
        if d.is_dir() and d.name.split("-")[-1].isdigit():
            if (d / COMPLETE).exists():
                found.append((int(d.name.split("-")[-1]), d))
            else:
                shutil.rmtree(d, ignore_errors=True)  # killed while writing it
    return max(found)[1] if found else None


def tokens_at(checkpoint: Path | None) -> int:
    if checkpoint is None or not (checkpoint / "trainer_state.json").exists():
        return 0
    return int(json.loads((checkpoint / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))


def load_final_checkpoint(trainer: Any, ckpt: Path, method: str) -> None:
    """Weights and state of a checkpoint written at the last step (``Trainer.train`` would run one step too many)."""
    from safetensors.torch import load_file
    from transformers import TrainerState

    if method in ("lora", "qlora"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(trainer.model, load_file(ckpt / "adapter_model.safetensors"))
    else:
        trainer.model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
