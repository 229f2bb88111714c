"""Multi-process training: the launch command (tier 1) and a real 2-process CPU run under accelerate (gloo) that
matches a 1-process run with the same effective batch (tier 2)."""

import json
import subprocess
from pathlib import Path

import pytest

from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
from finetune_pipeline.training.launch import CHILD_MODULE, child_command
from finetune_pipeline_tests.conftest import chat_row

pytestmark = pytest.mark.integration


@pytest.fixture()
def no_accelerate_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No accelerate config anywhere: an empty HF_HOME and no ACCELERATE_CONFIG_FILE."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("ACCELERATE_CONFIG_FILE", raising=False)
    return tmp_path


def test_python_launcher_gives_the_request_as_argument(no_accelerate_config: Path) -> None:
    assert child_command(RuntimeSpec(), request=Path("r.json"), python="py") == ["py", "-m", CHILD_MODULE, "r.json"]


def test_every_rank_gets_the_request_and_plain_ddp_without_a_config(no_accelerate_config: Path) -> None:
    cmd = child_command(RuntimeSpec(launcher="accelerate"), 4, request=Path("r.json"), python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"] and cmd[cmd.index("--num_processes") + 1] == "4"
    assert "--multi_gpu" in cmd and "--mixed_precision" not in cmd
    assert cmd[-3:] == ["-m", CHILD_MODULE, "r.json"]  # after the module: every process reads it
    assert "--multi_gpu" not in child_command(RuntimeSpec(launcher="accelerate"), 1, python="py")


@pytest.mark.parametrize("where", ["spec", "env", "default"])
def test_accelerates_own_config_is_honoured(
    no_accelerate_config: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """With a config file (FSDP, DeepSpeed, mixed precision live there) nothing is forced over it."""
    cfg = no_accelerate_config / "hf" / "accelerate" / "default_config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text("distributed_type: FSDP\nmixed_precision: bf16\nnum_processes: 2\n")
    runtime = RuntimeSpec(launcher="accelerate")
    if where == "spec":
        runtime = RuntimeSpec(launcher="accelerate", accelerate_config="hf/accelerate/default_config.yaml")
    elif where == "env":
        monkeypatch.setenv("ACCELERATE_CONFIG_FILE", str(cfg))
    cmd = child_command(runtime, 2, request=Path("r.json"), python="py", spec_dir=no_accelerate_config)
    assert cmd[cmd.index("--config_file") + 1] == str(cfg.resolve() if where == "spec" else cfg)
    assert not {"--multi_gpu", "--mixed_precision", "--dynamo_backend"} & set(cmd)


@pytest.mark.parametrize("procs", [1, 2])
def test_both_launchers_give_the_child_the_same_cpu_threads(
    no_accelerate_config: Path, monkeypatch: pytest.MonkeyPatch, procs: int
) -> None:
    """accelerate's own default is one thread a process (half of a 2-core CPU, and other float32 bits than the same
    run under python): the launcher passes the count a plain process would use, shared among the processes."""
    from finetune_pipeline.training.launch import child_launch, cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cmd = child_command(RuntimeSpec(launcher="accelerate"), procs, request=Path("r.json"), python="py")
    n = cmd[cmd.index("--num_cpu_threads_per_process") + 1]
    assert n == str(cpu_threads(procs)) and int(n) >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    cmd = child_command(RuntimeSpec(launcher="accelerate"), procs, request=Path("r.json"), python="py")
    assert cmd[cmd.index("--num_cpu_threads_per_process") + 1] == "3"
    how = child_launch(RuntimeSpec(), 1, Path("r.json"), Path("state"))
    assert how.env == {"OMP_NUM_THREADS": "3"}


def test_cpu_threads_stay_within_the_cpus_the_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from finetune_pipeline.training.launch import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)  # as under `taskset -c 0`
    assert cpu_threads(1) == 1 and cpu_threads(4) == 1


def test_a_config_files_thread_count_is_not_overridden(no_accelerate_config: Path) -> None:
    cfg = no_accelerate_config / "acc.yaml"
    cfg.write_text("distributed_type: NO\nnum_cpu_threads_per_process: 5\n")
    cmd = child_command(RuntimeSpec(launcher="accelerate", accelerate_config=str(cfg)), 1, python="py")
    assert "--num_cpu_threads_per_process" not in cmd


def test_a_missing_config_file_names_the_field_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"runtime.accelerate_config: .* does not exist; write one with `accelerate config --config_file",
    ):
        child_command(RuntimeSpec(launcher="accelerate", accelerate_config="nope.yaml"), 2, spec_dir=tmp_path)


def _train(tmp_path: Path, model: Path, name: str, procs: int, per_device: int, launcher: str):  # type: ignore[no-untyped-def]
    from finetune_pipeline.training.records import RESULT_FILE, TrainRequest, TrainResult

    rt = RuntimeSpec(launcher=launcher, logging_steps=1, save_steps=0, calibration_steps=0, eos_check_samples=0)
    t = TrainingSpec(
        max_steps=6,
        per_device_train_batch_size=per_device,
        num_processes=procs,
        learning_rate=5e-3,
        max_length=96,
        seed=3,
        warmup_ratio=0,
    )
    rows = [json.dumps(chat_row(i)["messages"]) for i in range(48)]
    lora = ModelSpec(lora={"r": 4, "alpha": 8, "dropout": 0.0})
    req = TrainRequest(
        base_path=str(model),
        model=lora,
        training=t,
        runtime=rt,
        train_messages=rows,
        eval_messages=[],
        output_dir=tmp_path / name,
    )
    req.save(tmp_path / f"{name}.json")
    out = subprocess.run(
        child_command(rt, procs, request=tmp_path / f"{name}.json"), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return TrainResult.load(tmp_path / name / RESULT_FILE)


def test_two_cpu_processes_train_like_one_with_the_same_effective_batch(
    tmp_path: Path, tiny_model: Path, no_accelerate_config: Path
) -> None:
    """2 processes x 2 rows (gloo) against 1 process x 4 rows: same loss curve within 1e-3 (relative), adapter
    weights within 10% (relative L2: Adam divides by the gradient's own scale, so tiny reduction-order differences
    show in parameters with near-zero gradients), and the loss falls."""
    from safetensors.torch import load_file

    two = _train(tmp_path, tiny_model, "two", 2, 2, "accelerate")
    one = _train(tmp_path, tiny_model, "one", 1, 4, "python")
    assert two.num_processes == 2 and one.num_processes == 1 and two.steps == one.steps == 6
    assert two.loss_history[-1][1] < two.loss_history[0][1]
    for (s2, l2), (s1, l1) in zip(two.loss_history, one.loss_history, strict=True):
        assert s2 == s1 and abs(l2 - l1) <= 1e-3 * abs(l1)
    wa, wb = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("two", "one"))
    assert wa.keys() == wb.keys()
    diff = sum(float(((wa[k] - wb[k]) ** 2).sum()) for k in wa) ** 0.5
    norm = sum(float((wb[k] ** 2).sum()) for k in wb) ** 0.5
    assert diff / norm < 0.10
    assert not (tmp_path / "two" / "checkpoint-1").exists()  # only rank 0 wrote outputs, into output_dir


def test_training_steps_share_one_pool_limited_by_the_instance(tmp_path: Path) -> None:
    """Sweeps and adapters of every pipeline take a slot of one Dagster pool; the shipped dagster.yaml gives it one
    slot, so two pipelines never train at once."""
    import dagster as dg
    import yaml

    from finetune_pipeline.defs.pipeline import build_pipeline_defs
    from finetune_pipeline.defs.training_assets import TRAINING_POOL
    from finetune_pipeline.spec import parse_spec
    from finetune_pipeline_tests.conftest import REPO

    sweep = "sweep: {enabled: true, search_space: {learning_rate: {type: float, low: 0.001, high: 0.01}}}\n"
    pools = {}
    for name in ("a", "b"):
        spec = parse_spec(f"name: {name}\nsource: {{incoming_dir: in}}\nregistry: {{model_name: m{name}}}\n" + sweep)
        for ad in build_pipeline_defs(spec).assets:  # type: ignore[union-attr]
            pools[ad.key.to_user_string()] = ad.op.pool
    assert {k for k, v in pools.items() if v == TRAINING_POOL} == {
        f"{n}/{a}" for n in ("a", "b") for a in ("hyperparameter_sweep", "adapter")
    }
    shipped = yaml.safe_load((REPO / "dagster.yaml").read_text())["concurrency"]
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides={"concurrency": shipped}) as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_the_same_request_runs_in_a_kubernetes_pod(tmp_path: Path, no_accelerate_config: Path) -> None:
    """launcher: k8s gives dagster-k8s' Pipes client the child's command, the request path on the mounted state
    volume, and the environment; the pod body is built by dagster-k8s itself (no cluster needed for that)."""
    from dagster_k8s.pipes import build_pod_body

    from finetune_pipeline.spec import parse_spec
    from finetune_pipeline.training.launch import child_launch

    text = (
        "name: p\nsource: {incoming_dir: in}\nregistry: {model_name: m}\ntraining: {num_processes: 2}\n"
        "runtime: {launcher: k8s, k8s: {image: 'registry.local/finetune:1', namespace: ml, state_pvc: ft-state, gpus: 2}}\n"
    )
    spec = parse_spec(text).spec
    state = tmp_path / "state"
    request = state / "pipelines" / "p" / "adapters" / "k.partial" / "request.json"
    how = child_launch(spec.runtime, spec.training.num_processes, request, state)
    assert how.extras == {"request": str(request)} and how.k8s is not None
    assert how.command[:3] == ["python", "-m", "accelerate.commands.launch"] and how.command[-1] == str(request)
    pod = build_pod_body("ft-train", how.k8s["image"], how.command, how.k8s["env"], None, how.k8s["base_pod_spec"])
    c = pod.spec.containers[0]
    assert c.image == "registry.local/finetune:1" and c.command == how.command
    env = {e.name: e.value for e in c.env}
    assert env["FINETUNE_HOME"] == str(state) and env["PYTHONUNBUFFERED"] == "1"
    assert c.volume_mounts[0].mount_path == str(state) and c.resources.limits == {"nvidia.com/gpu": "2"}
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "ft-state"
    assert pod.spec.restart_policy == "Never" and how.k8s["namespace"] == "ml"
    one = child_launch(spec.runtime, 1, request, state)
    assert one.command == ["python", "-m", CHILD_MODULE, str(request)]


def test_k8s_launcher_needs_its_pod_settings() -> None:
    from finetune_pipeline.spec import SpecError, parse_spec

    with pytest.raises(SpecError, match="runtime.launcher: k8s needs runtime.k8s"):
        parse_spec("name: p\nsource: {incoming_dir: in}\nregistry: {model_name: m}\nruntime: {launcher: k8s}\n")
