"""Which checkpoint a run resumes from, and what a full disk looks like to the person who has to fix it.

A checkpoint counts when it holds the completion marker (written after the trainer saved everything) and its files
read back whole: every ``*.safetensors`` file is as long as its header says, every torch pickle (``*.pt``,
``*.pth``, ``*.bin``) is a complete zip archive, ``trainer_state.json`` parses. A marked checkpoint whose files were
cut afterwards (a disk that filled, a copy that stopped) is skipped with a message and the one before it is used.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from finetune_pipeline.progress import LogFn
from finetune_pipeline.training.records import COMPLETE


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read back whole (None when its header and length agree)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is {size} bytes: shorter than a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{path.name} is cut inside its header ({size} bytes, header of {n})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path.name} has an unreadable header"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{path.name} is {size} bytes where its header needs {8 + n + end} (truncated)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it can)."""
    if not (folder / COMPLETE).exists():
        return "no completion marker (the run stopped while writing it)"
    for f in sorted(folder.iterdir()):
        if f.suffix == ".safetensors":
            problem = safetensors_problem(f)
        elif f.suffix in (".pt", ".pth", ".bin"):
            problem = None if zipfile.is_zipfile(f) else f"{f.name} is not a complete torch archive (truncated)"
        elif f.name == "trainer_state.json":
            try:
                json.loads(f.read_text())
                problem = None
            except ValueError:
                problem = f"{f.name} does not parse"
        else:
            continue
        if problem:
            return problem
    return None


def last_usable_checkpoint(folder: Path | None, log: LogFn = print, remove: bool = True) -> Path | None:
    """The newest ``checkpoint-N`` folder that is complete and reads back whole. Half-written ones (no marker) are
    removed; a marked one whose files are damaged is removed with a message naming the file, and the one before it
    is used. ``remove=False`` only looks."""
    if folder is None or not folder.is_dir():
        return None
    numbered = [d for d in folder.glob("checkpoint-*") if d.is_dir() and d.name.split("-")[-1].isdigit()]
    for d in sorted(numbered, key=lambda d: int(d.name.split("-")[-1]), reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        if (d / COMPLETE).exists():
            log(f"skipping checkpoint {d}: {problem}; resuming from the one before it")
        if remove:
            shutil.rmtree(d, ignore_errors=True)
    return None


class DiskFull(OSError):
    """The disk filled while a checkpoint or the model was written."""


def _is_disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "file write failed" in text:  # torch.save / safetensors wording
            return True
        e = e.__cause__ or e.__context__
    return False


def _free(folder: Path | None) -> str:
    p = folder
    while p is not None and not p.exists():
        p = p.parent if p.parent != p else None
    if p is None:
        return "?"
    usage = shutil.disk_usage(p)
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"


@contextmanager
def disk_full_explained(checkpoints: Path | None, output: Path) -> Iterator[None]:
    """Re-raise a full disk during training or saving as DiskFull naming the folders, their free space, the last
    good checkpoint and how to continue."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        last = last_usable_checkpoint(checkpoints, log=lambda m: None, remove=False)
        keep = f"the last complete checkpoint {last} is intact" if last else "no complete checkpoint was written yet"
        raise DiskFull(
            errno.ENOSPC,
            f"no space left on device while training wrote its checkpoints ({checkpoints}: {_free(checkpoints)}) "
            f"or the model ({output}: {_free(output)}): {keep}. Free space there (or point FINETUNE_HOME at a "
            f"bigger disk) and materialize the adapter again: it resumes from that checkpoint. ({exc})",
        ) from exc


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
