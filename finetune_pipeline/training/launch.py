"""How the training child process is started: plain ``python -m`` or ``accelerate launch`` with N processes."""

from __future__ import annotations

import sys

from finetune_pipeline.spec import RuntimeSpec

CHILD_MODULE = "finetune_pipeline.training.child"
PID_FILE = "child.pid"  # the child writes its process id next to its request (an operator can see or stop it)


def child_command(runtime: RuntimeSpec, num_processes: int = 1, python: str = sys.executable) -> list[str]:
    """The command line of the training child (the request comes through Dagster Pipes' extras).

    ``launcher: accelerate`` runs ``accelerate launch --num_processes N -m finetune_pipeline.training.child``:
    one process per GPU, data parallel (DDP); accelerate's own config (``accelerate config``, or the file in
    ``ACCELERATE_CONFIG_FILE``) adds mixed precision, FSDP or DeepSpeed. Every process trains; only the first
    talks to Dagster and writes the adapter.
    """
    if runtime.launcher == "python":
        return [python, "-m", CHILD_MODULE]
    cmd = [python, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd.append("--multi_gpu")
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", CHILD_MODULE]
    return cmd
