"""Where one training step of the adapter asset goes on this CPU: torch.profiler over a few steps of the asset's own
trainer (``sft.setup``), each operator put into one phase and one kind.

    python bench/profile_step.py --task demo|sql [--steps 3] [--batch 8] [--dtype auto] [--out FILE.json]
        [--training '{"attention": "sdpa", "half_precision_lora": false}' --lora '{"dropout": 0.05}']  # before

Phases: collation (the DataLoader's next batch), forward, backward (inside autograd's engine), optimizer (AdamW step
and zero_grad), other (the trainer's own work between them). Kinds: base matmul (the frozen linear layers and the LM
head), LoRA matmul (a matmul with the adapter rank as one dimension), attention (the SDPA kernels and their backward),
loss (log-softmax / NLL / cross-entropy), casts and copies (dtype conversions), host syncs (``.item()``: the op that
copies a tensor's value to Python), other ops (norms, rotary, SiLU, adds...). "Python / framework" is the step's wall
time minus the self time of every operator: interpreter, hooks, dispatch and the profiler's own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mkldnn", "mkldnn", "aten::matmul")
ATTN = ("scaled_dot_product", "flash_attention", "_efficient_attention")
LOSS = ("log_softmax", "nll_loss", "cross_entropy")
CASTS = ("aten::_to_copy", "aten::copy_", "aten::to", "aten::clone", "aten::contiguous")
SYNC = ("aten::_local_scalar_dense", "aten::item")


def rows_for(task: str, n: int) -> list[str]:
    if task == "sql":
        from bench.sql_task import make_rows

        return make_rows(n, 0)[0]
    from bench.train_bench import rows_from_demo

    return rows_from_demo(Path(tempfile.mkdtemp(prefix="profile_rows_")), n)


def phase_of(ev: Any) -> str:
    p = ev
    while p is not None:
        n = p.name
        if n.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if n.startswith("Optimizer.step") or n.startswith("Optimizer.zero_grad"):
            return "optimizer"
        if n.startswith("enumerate(DataLoader)"):
            return "collation"
        if n == "fp::forward":
            return "forward"
        p = p.cpu_parent
    return "other"


def kind_of(ev: Any, rank: int) -> str:
    n = ev.name
    if any(k in n for k in SYNC):
        return "host sync"
    if any(k in n for k in ATTN):
        return "attention"
    if any(k in n for k in LOSS):
        return "loss"
    if any(n.startswith(k) for k in MATMUL):
        shapes = [s for s in (ev.input_shapes or []) if s]
        return "LoRA matmul" if any(rank in s for s in shapes) else "base matmul"
    if any(n == k for k in CASTS):
        return "casts and copies"
    return "other ops"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="demo", choices=["demo", "sql"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=2, help="unprofiled steps first (timed: the wall s/step)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--training", default="{}", help="JSON: extra training settings (the candidate's)")
    ap.add_argument(
        "--lora",
        default="{}",
        help="JSON: LoRA settings over r16 / alpha 32 and the spec's defaults, e.g. '{\"dropout\": 0.05}' (before)",
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("FINETUNE_HOME", str(REPO / ".finetune"))
    import torch
    from transformers import TrainerCallback

    from finetune_pipeline.models.base import provision_base_model
    from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
    from finetune_pipeline.training.sft import TrainRequest, fit, setup

    base = provision_base_model("smollm2-135m-instruct").path
    total = args.warm + args.steps + 1
    rows = rows_for(args.task, total * args.batch)
    rank = 16
    req = TrainRequest(
        base_path=base,
        model=ModelSpec(dtype=args.dtype, lora={"r": rank, "alpha": 32, **json.loads(args.lora)}),
        training=TrainingSpec(
            max_steps=total, per_device_train_batch_size=args.batch, max_length=256, **json.loads(args.training)
        ),
        runtime=RuntimeSpec(logging_steps=1, save_steps=0, calibration_steps=0, eos_check_samples=0),
        train_messages=rows,
        eval_messages=[],
        output_dir=Path(tempfile.mkdtemp(prefix="profile_out_")),
        save=False,
    )
    session = setup(req, log=lambda m: None)
    model = session.trainer.model
    fwd_hooks = []
    for m in [model.get_base_model() if hasattr(model, "get_base_model") else model]:
        state: dict[str, Any] = {}

        def pre(mod: Any, a: Any, kw: Any, st: dict = state) -> None:
            if torch.is_grad_enabled():
                st["r"] = torch.profiler.record_function("fp::forward")
                st["r"].__enter__()

        def post(mod: Any, a: Any, kw: Any, out: Any, st: dict = state) -> None:
            if "r" in st:
                st.pop("r").__exit__(None, None, None)

        inner = getattr(m, m.base_model_prefix)  # the backbone (the lean loss calls it directly); loss is outside
        fwd_hooks.append(inner.register_forward_pre_hook(pre, with_kwargs=True))
        fwd_hooks.append(inner.register_forward_hook(post, with_kwargs=True))

    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        record_shapes=True,
        schedule=torch.profiler.schedule(wait=args.warm, warmup=1, active=args.steps, repeat=1),
    )
    times: list[float] = []

    class Step(TrainerCallback):
        t = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            pass

        def on_step_end(self, *a: Any, **k: Any) -> None:
            now = time.perf_counter()
            if self.t:
                times.append(now - self.t)
            self.t = now
            prof.step()

    session.trainer.add_callback(Step())
    prof.start()
    fit(session)
    prof.stop()
    # times[i] is the step ending i+2 (the first step has no start mark): steps 2..warm are unprofiled
    unprofiled = times[: args.warm - 1] or times[:1]
    profiled = times[args.warm : args.warm + args.steps]
    cells: dict[tuple[str, str], float] = defaultdict(float)
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])  # (phase, op) -> [us, calls]
    op_total = 0.0
    main_thread = None
    events = prof.events()
    for ev in events:
        if ev.name.startswith("ProfilerStep"):
            main_thread = ev.thread
    for ev in events:
        if ev.thread != main_thread or ev.name.startswith("ProfilerStep"):
            continue
        us = ev.self_cpu_time_total
        if us <= 0 or ev.name.startswith(("autograd::engine", "Optimizer.", "enumerate(", "fp::")):
            cells[(phase_of(ev), "range overhead")] += us if not ev.name.startswith("fp::") else 0
            op_total += us if not ev.name.startswith("fp::") else 0
            continue
        cells[(phase_of(ev), kind_of(ev, rank))] += us
        by_op[(phase_of(ev), ev.name)][0] += us
        by_op[(phase_of(ev), ev.name)][1] += 1
        op_total += us
    n = max(1, len(profiled))
    wall_ms = sum(profiled) / n * 1e3
    table = {
        f"{p} / {k}": v / 1e3 / n for (p, k), v in sorted(cells.items(), key=lambda x: -x[1]) if v / 1e3 / n >= 0.5
    }
    table["Python / framework (wall - operator self time)"] = wall_ms - op_total / 1e3 / n
    tokens = sum(len(r) for r in session.trainer.train_dataset["input_ids"][: args.batch])
    res = session.trainer.state
    report = {
        "task": args.task,
        "dtype": session.dtype,
        "batch": args.batch,
        "training": json.loads(args.training),
        "lora": json.loads(args.lora),
        "attention": model.config._attn_implementation,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "step_seconds_unprofiled": sum(unprofiled) / max(1, len(unprofiled)),
        "step_ms_profiled": wall_ms,
        "tokens_per_step_approx": tokens,
        "tokens_seen": int(res.num_input_tokens_seen),
        "ms_per_step": {k: round(v, 1) for k, v in table.items()},
        "top_ops_ms_per_step": {  # the 25 operators with the most self time, and their calls per step
            f"{p} / {op}": [round(v[0] / 1e3 / n, 1), int(v[1] / n)]
            for (p, op), v in sorted(by_op.items(), key=lambda x: -x[1][0])[:25]
        },
        "operator_calls_per_step": int(sum(v[1] for v in by_op.values()) / n),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
