"""Training benchmarks (issues 4 and 18), each a ratio against its baseline measured in the same run.

    python bench/train_bench.py [--which a,b,c,d] [--steps 6] [--repeats 2] [--out bench/results/train_bench.json]
    (or: make bench-train)

Every training run is its own child process (as the adapter asset runs it), baseline and candidate alternate
(A B A B ...) so that load from other processes hits both alike, and each ratio is the median over repeats.

(a) the adapter's training child vs a bare trl SFTTrainer script, same model, data and settings (bf16 weights,
    LoRA r16 all-linear, batch 8, loss on the answer, no packing): real (non-padding) tokens/s.
(b) the asset's default settings vs the bare script's defaults (fp32, no packing; trl's gradient checkpointing on,
    and also off): tokens/s, and the held-out loss of both adapters after the same examples (equal loss check).
(c) padding-free and packing vs naive padding on short examples of varied length (asset child, defaults otherwise).
(d) FLOP utilisation of the asset's run against torch matmul in the dtype used (and fp32 / bf16 matmul peaks).
(e) today's asset (the tree at --baseline, unpacked with git archive) vs this tree's, same spec, on the demo tickets
    and a short-row NL->SQL task (bench/sql_task.py): tokens/s, FLOP utilisation against the matmul peak measured in
    the same run, held-out answer loss, steps in 5 minutes; plus this tree's float32 step vs its bf16 step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rows_from_demo(tmp: Path, n: int) -> list[str]:
    from examples.demo_tickets import write_demo_drops

    out = []
    for p in write_demo_drops(tmp / "drops"):
        for line in p.read_text().splitlines():
            try:
                m = json.loads(line)["messages"]
            except (ValueError, KeyError, TypeError):
                continue
            if isinstance(m, list) and m and m[-1].get("role") == "assistant" and m[-1].get("content"):
                out.append(json.dumps(m))
    return out[:n]


def short_varied(rows: list[str], seed: int = 0) -> list[str]:
    """Short chats of varied length: no system prompt, the ticket cut to 3..60 words."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        m = json.loads(r)
        user = next(x for x in m if x["role"] == "user")["content"].split()
        out.append(
            json.dumps(
                [{"role": "user", "content": " ".join(user[: rng.randint(3, 60)])}, m[-1]],
            )
        )
    return out


def run_child(
    base: str,
    model: dict,
    training: dict,
    rows: list[str],
    work: Path,
    measure: bool,
    code: Path = REPO,
    calibration_steps: int = 0,
) -> dict[str, Any]:
    """The adapter asset's training child (python -m finetune_pipeline.training.child), without Dagster; ``code``:
    the source tree whose child runs (another commit's, for "today's asset"). The request holds only the fields set
    here, so an older tree reads it too."""
    from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
    from finetune_pipeline.training.records import TrainRequest

    work.mkdir(parents=True, exist_ok=True)
    req = TrainRequest(
        base_path=base,
        model=ModelSpec(**model),
        training=TrainingSpec(**training),
        runtime=RuntimeSpec(logging_steps=1, save_steps=0, calibration_steps=calibration_steps, eos_check_samples=0),
        train_messages=rows,
        eval_messages=[],
        output_dir=work / "out",
        measure_cost=measure,
    )
    (work / "request.json").write_text(req.model_dump_json(exclude_unset=True, by_alias=True))
    subprocess.run(
        [sys.executable, "-m", "finetune_pipeline.training.child", str(work / "request.json")],
        cwd=code,
        env={**os.environ, "PYTHONPATH": str(code)},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    res = json.loads((work / "out" / "train_result.json").read_text())
    res["adapter"] = str(work / "out")
    return res


def run_bare(base: str, rows: list[str], work: Path, **kw: Any) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    req = {"base_path": base, "rows": rows, "out": str(work), **kw}
    (work / "request.json").write_text(json.dumps(req))
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bare_trl.py"), str(work / "request.json")],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def heldout_loss(base: str, adapter: str, rows: list[str], through_eos: bool = True) -> float:
    """Mean NLL of the answers given the prompts, in float32, with the base model's own chat template: the same
    yardstick for every adapter. ``through_eos``: the answer tokens and the end-of-turn token, nothing after it (what
    generation needs: it stops there); False: also the template's text after the end-of-turn token (ChatML's
    trailing newline), which a model trained with an assistant mask never sees as a target."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    nll, n = 0.0, 0
    for r in rows:
        m = json.loads(r)
        p = tok.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        f = tok.apply_chat_template(m, tokenize=True, return_dict=False)
        p = list(p["input_ids"] if isinstance(p, dict) else p)
        f = list(f["input_ids"] if isinstance(f, dict) else f)
        if through_eos and tok.eos_token_id in f[len(p) :]:
            f = f[: len(p) + f[len(p) :].index(tok.eos_token_id) + 1]
        ids = torch.tensor([f])
        labels = torch.tensor([[-100] * len(p) + f[len(p) :]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        nll += float(loss)
        n += int((labels[0, 1:] != -100).sum())
    return nll / n


def alternate(n: int, runs: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
    for i in range(n):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            res = fn(i)
            print(
                f"  {name} #{i}: {res['tokens_per_second']:.1f} tokens/s ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            out[name].append(res)
    return out


def med(results: list[dict[str, Any]], key: str = "tokens_per_second") -> float:
    return float(statistics.median(r[key] for r in results))


def cpu_ratio(cand: list[dict[str, Any]], base: list[dict[str, Any]]) -> float:
    """Ratio of tokens per CPU-second (all threads): less sensitive to other processes than wall-clock tokens/s."""
    per = lambda rs: statistics.median(r["train_tokens"] / r["cpu_seconds"] for r in rs)  # noqa: E731
    return float(per(cand) / per(base))


def baseline_tree(ref: str, tmp: Path) -> Path:
    """The source tree of commit ``ref`` (today's asset), unpacked into ``tmp`` with git archive."""
    out = tmp / f"code-{ref}"
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}/{fifteen:.1f} on {os.cpu_count()} cores"


def section_e(args: Any, base: str, tmp: Path) -> dict[str, Any]:
    """Today's asset (the tree at --baseline) vs this tree's asset, same spec (the asset's defaults: dtype auto, LoRA
    r16 on all linear layers, each tree's default LoRA dropout and attention, batch --batch, learning rate 2e-4), on
    the demo tickets and on the short-row SQL task;
    this tree's asset with the shared-prefix packing off (``new_padded``); and this tree's asset in float32 vs its
    bf16 step. Runs alternate (A B A B) so load from others hits both."""
    from bench.sql_task import make_rows
    from finetune_pipeline.training.cost import measure_matmul_peak

    old = baseline_tree(args.baseline, tmp)
    n = args.steps * args.batch
    demo = rows_from_demo(tmp, n + args.heldout)
    sql_train, sql_held = make_rows(n, args.heldout, seed=1)
    tasks = {"demo": (demo[:n], demo[n:]), "sql": (sql_train, sql_held)}
    tasks = {k: tasks[k] for k in args.tasks.split(",")}
    first = next(iter(tasks))
    lora = {"r": 16, "alpha": 32, "target_modules": "all-linear"}  # each tree's own default dropout and attention
    train = {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": 2e-4, "seed": 42}
    peaks = {dt: measure_matmul_peak(dt).gflops for dt in ("float32", "bfloat16")}
    out: dict[str, Any] = {"baseline": args.baseline, "matmul_gflops": peaks, "load_start": load_note()}
    for task, (rows, held) in tasks.items():
        arms = {
            "today": lambda i, r=rows, t=task: run_child(
                base, {"lora": lora}, train, r, tmp / f"e-{t}-today-{i}", True, old, calibration_steps=2
            ),
            "new": lambda i, r=rows, t=task: run_child(
                base, {"lora": lora}, train, r, tmp / f"e-{t}-new-{i}", True, calibration_steps=2
            ),
        }
        arms["new_padded"] = lambda i, r=rows, t=task: run_child(  # this tree without the shared-prefix packing
            base,
            {"lora": lora},
            {**train, "share_prefix": False},
            r,
            tmp / f"e-{t}-padded-{i}",
            True,
            calibration_steps=2,
        )
        if task == first:
            arms["new_float32"] = lambda i, r=rows, t=task: run_child(
                base, {"lora": lora, "dtype": "float32"}, train, r, tmp / f"e-{t}-fp32-{i}", True, calibration_steps=2
            )
        if args.reverse:  # the other order, to see how much falling or rising load favoured one arm
            arms = dict(reversed(list(arms.items())))
        print(f"(e) {task}: {', '.join(arms)} ({load_note()})", flush=True)
        res = alternate(args.repeats, arms)
        row: dict[str, Any] = {"load_end": load_note()}
        for arm, rs in res.items():
            sps = statistics.median(r.get("seconds_per_step") or r["wall_seconds"] / r["steps"] for r in rs)
            row[arm] = {
                "dtype": rs[0]["dtype"],
                "tokens_per_second": med(rs),
                "flop_utilisation": rs[0]["flop_utilisation"],
                "matmul_peak_tflops": rs[0]["matmul_peak_tflops"],
                "seconds_per_step": sps,
                "steps_in_5_minutes": int(300 // sps),
                "heldout_loss": heldout_loss(base, rs[0]["adapter"], held),
                "runs_tokens_per_second": [r["tokens_per_second"] for r in rs],
                "prefix_tokens_saved": rs[0].get("prefix_tokens_saved", 0),
                "train_tokens": rs[0].get("train_tokens"),
            }
        row["tokens_per_second_ratio"] = row["new"]["tokens_per_second"] / row["today"]["tokens_per_second"]
        row["heldout_loss_ratio"] = row["new"]["heldout_loss"] / row["today"]["heldout_loss"]
        row["padded_tokens_per_second_ratio"] = (
            row["new_padded"]["tokens_per_second"] / row["today"]["tokens_per_second"]
        )
        row["shared_prefix_speedup"] = row["new"]["tokens_per_second"] / row["new_padded"]["tokens_per_second"]
        if "new_float32" in row:
            row["bf16_step_speedup_over_float32"] = (
                row["new_float32"]["seconds_per_step"] / row["new"]["seconds_per_step"]
            )
            row["bf16_matmul_speedup_over_float32"] = peaks["bfloat16"] / peaks["float32"]
        print(json.dumps(row, indent=2), flush=True)
        out[task] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--which", default="a,b,c,d")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "train_bench.json"))
    ap.add_argument("--baseline", default="dc4102f", help="(e): the commit whose asset is 'today's'")
    ap.add_argument("--tasks", default="demo,sql", help="(e): demo, sql or both")
    ap.add_argument("--reverse", action="store_true", help="(e): run the new asset before today's")
    args = ap.parse_args()
    which = set(args.which.split(","))
    os.environ.setdefault("FINETUNE_HOME", str(REPO / ".finetune"))
    from finetune_pipeline.models.base import provision_base_model, resolve_dtype
    from finetune_pipeline.training.cost import measure_matmul_peak

    base = provision_base_model("smollm2-135m-instruct").path
    tmp = Path(tempfile.mkdtemp(prefix="train_bench_"))
    rows = rows_from_demo(tmp, args.steps * args.batch + args.heldout)
    train_rows, held = rows[: args.steps * args.batch], rows[args.steps * args.batch :]
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    common = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "learning_rate": 1e-3,
        "max_length": 256,
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "seed": 42,
    }
    asset_defaults = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch,
        "learning_rate": 1e-3,
        "max_length": 256,
        "seed": 42,
    }
    bare_kw = {
        "steps": args.steps,
        "batch": args.batch,
        "lr": 1e-3,
        "max_length": 256,
        "lora_r": 16,
        "lora_alpha": 32,
        "seed": 42,
    }
    report: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct",
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "dtype_auto": resolve_dtype("auto"),
    }
    print(f"bench: {args.steps} steps x batch {args.batch}, {args.repeats} repeats, work dir {tmp}", flush=True)

    if "e" in which:
        print("(e) today's asset vs this one: tokens/s, FLOP utilisation, held-out loss, steps in 5 minutes")
        report["e"] = section_e(args, base, tmp)

    if "a" in which:
        print("(a) asset child vs bare trl script, same settings (bf16 weights, answer-only loss, no packing)")
        same_model = {"method": "lora", "dtype": "bfloat16", "lora": lora}
        same_train = {**common, "assistant_only_loss": False, "completion_only_loss": True}
        res = alternate(
            args.repeats,
            {
                "bare": lambda i: run_bare(
                    base, train_rows, tmp / f"a-bare-{i}", dtype="bfloat16", gradient_checkpointing=False, **bare_kw
                ),
                "asset": lambda i: run_child(base, same_model, same_train, train_rows, tmp / f"a-asset-{i}", False),
            },
        )
        report["a"] = {
            "bare_tokens_per_second": med(res["bare"]),
            "asset_tokens_per_second": med(res["asset"]),
            "ratio": med(res["asset"]) / med(res["bare"]),
            "ratio_tokens_per_cpu_second": cpu_ratio(res["asset"], res["bare"]),
            "target": ">= 0.97",
            "runs": {k: [r["tokens_per_second"] for r in v] for k, v in res.items()},
        }
        print(f"(a) ratio {report['a']['ratio']:.2f}", flush=True)

    if "b" in which:
        print("(b) asset defaults vs bare script defaults (fp32, no packing), same examples")
        res = alternate(
            args.repeats,
            {
                "bare_default": lambda i: run_bare(
                    base, train_rows, tmp / f"b-bare-{i}", dtype="float32", gradient_checkpointing=True, **bare_kw
                ),
                "bare_default_no_gc": lambda i: run_bare(
                    base, train_rows, tmp / f"b-bare-nogc-{i}", dtype="float32", gradient_checkpointing=False, **bare_kw
                ),
                # the asset's own defaults (dtype auto, linear schedule with its warm-up, answer-only loss), with the
                # same learning rate, steps, batch, length and adapter as the bare script
                "asset_default": lambda i: run_child(
                    base, {"lora": lora}, asset_defaults, train_rows, tmp / f"b-asset-{i}", True
                ),
            },
        )
        losses = {k: heldout_loss(base, v[0]["adapter"], held) for k, v in res.items()}
        losses_with_newline = {k: heldout_loss(base, v[0]["adapter"], held, through_eos=False) for k, v in res.items()}
        report["b"] = {
            "bare_default_tokens_per_second": med(res["bare_default"]),
            "bare_default_no_gc_tokens_per_second": med(res["bare_default_no_gc"]),
            "asset_default_tokens_per_second": med(res["asset_default"]),
            "ratio_vs_trl_defaults": med(res["asset_default"]) / med(res["bare_default"]),
            "ratio_vs_trl_defaults_tokens_per_cpu_second": cpu_ratio(res["asset_default"], res["bare_default"]),
            "ratio_vs_trl_defaults_without_gradient_checkpointing": med(res["asset_default"])
            / med(res["bare_default_no_gc"]),
            "heldout_answer_loss": losses,
            "heldout_answer_loss_incl_text_after_eos": losses_with_newline,
            "loss_ratio_asset_vs_bare": losses["asset_default"] / losses["bare_default"],
            "asset_dtype": res["asset_default"][0]["dtype"],
            "asset_flop_utilisation": res["asset_default"][0]["flop_utilisation"],
            "asset_matmul_peak_tflops": res["asset_default"][0]["matmul_peak_tflops"],
            "heldout_rows": len(held),
            "examples_seen": args.steps * args.batch,
            "target": ">= 2x at equal loss",
            "runs": {k: [r["tokens_per_second"] for r in v] for k, v in res.items()},
        }
        print(
            f"(b) ratio {report['b']['ratio_vs_trl_defaults']:.2f} "
            f"(no gc {report['b']['ratio_vs_trl_defaults_without_gradient_checkpointing']:.2f}); "
            f"held-out loss {losses}",
            flush=True,
        )

    if "c" in which:
        print("(c) padding-free / packing vs padding on short examples of varied length")
        short = short_varied(rows_from_demo(tmp, args.steps * args.batch * 2))[: args.steps * args.batch * 2]
        short_train = {**common, "per_device_train_batch_size": args.batch * 2}
        res = alternate(
            args.repeats,
            {
                "padding": lambda i: run_child(base, {"lora": lora}, short_train, short, tmp / f"c-pad-{i}", False),
                "padding_free": lambda i: run_child(
                    base, {"lora": lora}, {**short_train, "padding_free": True}, short, tmp / f"c-pf-{i}", False
                ),
                "packing": lambda i: run_child(
                    base, {"lora": lora}, {**short_train, "packing": True}, short, tmp / f"c-pack-{i}", False
                ),
            },
        )
        report["c"] = {
            "padding_tokens_per_second": med(res["padding"]),
            "padding_free_tokens_per_second": med(res["padding_free"]),
            "packing_tokens_per_second": med(res["packing"]),
            "ratio_padding_free": med(res["padding_free"]) / med(res["padding"]),
            "ratio_packing": med(res["packing"]) / med(res["padding"]),
            "ratio_padding_free_tokens_per_cpu_second": cpu_ratio(res["padding_free"], res["padding"]),
            "target": ">= 2x where attention kernels allow (varlen flash attention on GPU)",
            "runs": {k: [r["tokens_per_second"] for r in v] for k, v in res.items()},
        }
        print(
            f"(c) padding-free {report['c']['ratio_padding_free']:.2f}x, packing {report['c']['ratio_packing']:.2f}x",
            flush=True,
        )

    if "d" in which:
        print("(d) FLOP utilisation vs torch matmul in the dtype used")
        peaks = {dt: measure_matmul_peak(dt).gflops for dt in ("float32", "bfloat16")}
        res = run_child(base, {"lora": lora}, common, train_rows, tmp / "d-asset", True)
        report["d"] = {
            "matmul_gflops": peaks,
            "dtype": res["dtype"],
            "achieved_tflops": res["achieved_tflops"],
            "matmul_peak_tflops_in_run": res["matmul_peak_tflops"],
            "flop_utilisation": res["flop_utilisation"],
            "flops_per_token": res["flops_per_token"],
            "tokens_per_second": res["tokens_per_second"],
            "peak_memory_mb": res["peak_memory_mb"],
        }
        print(f"(d) {res['flop_utilisation']:.1%} of the {res['dtype']} matmul peak", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
