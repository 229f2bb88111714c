"""How the training child process is started: plain ``python -m`` or ``accelerate launch`` with N processes."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def cpu_threads(num_processes: int = 1) -> int:
    """CPU threads per training process: ``OMP_NUM_THREADS`` when it is set, else the machine's physical cores
    (what torch itself takes by default), at most the CPUs this process may run on, shared among the processes.

    Both launchers start their child with this count. accelerate's own default without ``--cpu`` is one thread a
    process, which halved a 2-core CPU and, in float32, changed the adapter's last bits against the same run
    started with ``launcher: python`` (matmul splits its sums by thread count)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        import psutil  # accelerate's dependency

        cores = psutil.cpu_count(logical=False) or usable
    except ImportError:
        cores = usable
    return max(1, min(cores, usable) // max(1, num_processes))


def _config_sets_threads(config: Path) -> bool:
    try:
        return "num_cpu_threads_per_process" in config.read_text()
    except OSError:
        return False


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
    to Dagster and writes the adapter. ``--num_cpu_threads_per_process`` is ``cpu_threads`` unless the config file
    sets it.
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
    if config is None or not _config_sets_threads(config):
        cmd += ["--num_cpu_threads_per_process", str(cpu_threads(num_processes))]
    return cmd + tail


@dataclass(frozen=True)
class ChildLaunch:
    """Everything needed to start the training child: the command, the Pipes extras, and for ``launcher: k8s`` the
    pod (image, namespace, environment, pod spec for dagster-k8s' ``PipesK8sClient.run``)."""

    command: list[str]
    extras: dict[str, str]
    k8s: dict[str, Any] | None = None
    env: dict[str, str] | None = None  # extra environment of a local child (e.g. its CPU thread count)


def child_launch(
    runtime: RuntimeSpec, num_processes: int, request: Path, state_root: Path, spec_dir: Path | None = None
) -> ChildLaunch:
    """How the adapter's training child is started for this runtime; the request file travels by path, so the
    pod mounts the state root (``runtime.k8s.state_pvc``) at the same path."""
    extras = {"request": str(request)}
    if runtime.launcher != "k8s":
        env = {"OMP_NUM_THREADS": str(cpu_threads(num_processes))}
        return ChildLaunch(child_command(runtime, num_processes, request, spec_dir=spec_dir), extras, env=env)
    k = runtime.k8s
    if k is None:
        raise ValueError("runtime.launcher: k8s needs runtime.k8s (image, state_pvc)")
    inner = runtime.model_copy(update={"launcher": "accelerate" if num_processes > 1 else "python"})
    command = child_command(inner, num_processes, request, python="python")
    container: dict[str, Any] = {
        "volume_mounts": [{"name": "finetune-state", "mount_path": str(state_root)}],
        **({"resources": {"limits": {"nvidia.com/gpu": str(k.gpus)}}} if k.gpus else {}),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "finetune-state", "persistent_volume_claim": {"claim_name": k.state_pvc}}],
        "restart_policy": "Never",
        **({"service_account_name": k.service_account} if k.service_account else {}),
    }
    env = {"PYTHONUNBUFFERED": "1", "FINETUNE_HOME": str(state_root)}
    return ChildLaunch(
        command, extras, {"image": k.image, "namespace": k.namespace, "env": env, "base_pod_spec": pod_spec}
    )
