"""How the training child process is started: plain ``python -m`` or ``accelerate launch`` with N processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune_pipeline.spec import RuntimeSpec

CHILD_MODULE = "finetune_pipeline.training.child"
PID_FILE = "child.pid"  # the child writes its process id next to its request (an operator can see or stop it)


def accelerate_config_file(runtime: RuntimeSpec, spec_dir: Path | None = None) -> Path | None:
    """accelerate's own config file, if there is one: ``runtime.accelerate_config`` (relative to the spec file),
    else ``ACCELERATE_CONFIG_FILE``, else accelerate's default (``$HF_HOME/accelerate/default_config.yaml``)."""
    if runtime.accelerate_config:
        p = Path(runtime.accelerate_config).expanduser()
        p = p if p.is_absolute() or spec_dir is None else spec_dir / p
        if not p.is_file():
            raise FileNotFoundError(
                f"runtime.accelerate_config: {p} does not exist; write one with `accelerate config --config_file {p}`"
            )
        return p.resolve()
    env = os.environ.get("ACCELERATE_CONFIG_FILE")
    if env:
        return Path(env).expanduser()
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    default = Path(hf_home).expanduser() / "accelerate" / "default_config.yaml"
    return default if default.is_file() else None


def child_command(
    runtime: RuntimeSpec,
    num_processes: int = 1,
    request: Path | None = None,
    python: str = sys.executable,
    spec_dir: Path | None = None,
) -> list[str]:
    """The command line of the training child; ``request`` (the request file) is given to every process.

    ``launcher: accelerate`` runs ``accelerate launch --num_processes N -m finetune_pipeline.training.child REQUEST``.
    With an accelerate config file (see ``accelerate_config_file``) only ``--config_file`` is added, so its
    distributed type (DDP, FSDP, DeepSpeed), mixed precision and machines are honoured. Without one, N > 1 means
    plain data parallel (``--multi_gpu``: NCCL on GPUs, gloo on CPU). Every process trains; only the first talks
    to Dagster and writes the adapter.
    """
    tail = ["-m", CHILD_MODULE, *([str(request)] if request is not None else [])]
    if runtime.launcher == "python":
        return [python, *tail]
    cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    config = accelerate_config_file(runtime, spec_dir)
    if config is not None:
        cmd += ["--config_file", str(config)]
    else:
        cmd += (["--multi_gpu"] if num_processes > 1 else []) + ["--num_machines", "1", "--dynamo_backend", "no"]
    return cmd + tail
