"""CUDA paths of the training recipe, checked on a lent GPU (no GPU in CI: this is run by hand on one).

What it runs, each through the project's own ``training.sft.train`` (setup -> fit -> finalize):
  lora-bf16   LoRA r16 all-linear, weights bf16
  qlora-nf4   QLoRA: base 4-bit nf4 (bitsandbytes, double quant), compute bf16
  lora-fp32   the same LoRA in float32, as the baseline of the bf16 speed ratio
on a SmolLM2-135M-shaped llama (random init: the weights cannot travel to the GPU machine; the shapes, the kernels
and the memory are what is checked), with the packaged SmolLM2 tokenizer. Per run: loss falling, every LoRA tensor
changed, tokens/s, peak CUDA memory. Then the QLoRA merge rule: the adapter folded into the DEQUANTISED 4-bit base
gives the logits of the adapter on the 4-bit base (a merge into the original 16-bit weights does not).

Issue 18 on CUDA: the micro-batch rule with the batch fields left out (the device's own budget, then a budget that
is 1 MB under the estimate at 8 rows: 4 x 2), with its memory estimate against the measured peak; and, with ``--baseline-tree DIR``
(``git archive dc4102f finetune_pipeline | tar -x -C DIR``), today's asset against this tree's on the same request
(LoRA r16 all-linear, dtype auto, batch 8, learning rate 2e-4; each tree's own dropout and attention), on the
short-row SQL task and on short ticket chats, each run its own process, arms alternating.

    python bench/gpu_check.py --tokenizer DIR --out results.json     # DIR: a saved SmolLM2 tokenizer
        [--baseline-tree DIR] [--speed-steps 30] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def smollm2_shaped(out: Path, tokenizer_dir: Path, layers: int = 30) -> Path:
    """A SmolLM2-135M-shaped llama with random weights, saved with the tokenizer (safetensors)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def rows(n: int) -> list[str]:
    """Short chat rows with a learnable answer (the label is a function of the text)."""
    out = []
    for i in range(n):
        a, b = i % 17, (i * 7) % 13
        msgs = [
            {"role": "user", "content": f"Ticket {i}: printer {a} on floor {b} shows error E{a + b}. Which team?"},
            {"role": "assistant", "content": "hardware" if (a + b) % 2 else "network"},
        ]
        out.append(json.dumps(msgs))
    return out


def run_one(name: str, base: Path, work: Path, method: str, dtype: str, steps: int) -> dict[str, Any]:
    import torch

    from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
    from finetune_pipeline.training.sft import TrainRequest, train

    torch.cuda.reset_peak_memory_stats()
    req = TrainRequest(
        base_path=str(base),
        model=ModelSpec(method=method, dtype=dtype, lora={"r": 16, "alpha": 32, "dropout": 0.0}),
        training=TrainingSpec(
            max_steps=steps,
            per_device_train_batch_size=16,
            learning_rate=2e-3,
            max_length=128,
            warmup_ratio=0.0,
            gradient_checkpointing=False,
        ),
        runtime=RuntimeSpec(logging_steps=1, calibration_steps=0, eos_check_samples=0),
        train_messages=rows(512),
        eval_messages=rows(32),
        output_dir=work / name,
        measure_cost=True,
    )
    t0 = time.perf_counter()
    res = train(req, log=lambda m: print(f"[{name}] {m}", flush=True))
    wall = time.perf_counter() - t0
    losses = [loss for _, loss in res.loss_history]
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return {
        "run": name,
        "method": method,
        "dtype": dtype,
        "steps": res.steps,
        "loss_first3": round(head, 4),
        "loss_last3": round(tail, 4),
        "loss_fell": tail < head,
        "eval_loss": None if math.isnan(res.eval_loss) else round(res.eval_loss, 4),
        "lora_tensors_changed": f"{res.lora_tensors_changed}/{res.lora_tensors_total}",
        "tokens_per_second": round(res.tokens_per_second, 1),
        "wall_seconds": round(wall, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "device": torch.cuda.get_device_name(0),
    }


def micro_batch_check(base: Path, work: Path, budget_mb: float | None) -> dict[str, Any]:
    """The batch fields left out: the micro-batch the rule chose on CUDA (the device's budget, or ``budget_mb``), the
    memory estimate at that micro-batch and the peak CUDA memory the run measured."""
    import torch

    from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
    from finetune_pipeline.training.sft import TrainRequest, train

    torch.cuda.reset_peak_memory_stats()
    name = f"micro-batch-{'device' if budget_mb is None else int(budget_mb)}"
    req = TrainRequest(
        base_path=str(base),
        model=ModelSpec(method="lora", dtype="bfloat16", lora={"r": 16, "alpha": 32}),
        training=TrainingSpec(max_steps=6, learning_rate=2e-4, max_length=256),
        runtime=RuntimeSpec(logging_steps=1, calibration_steps=0, eos_check_samples=0),
        train_messages=sql_rows(64),
        eval_messages=[],
        output_dir=work / name,
        measure_cost=True,
        memory_budget_mb=budget_mb,
    )
    res = train(req, log=lambda m: print(f"[{name}] {m}", flush=True))
    est = res.memory_estimate_mb.get("total_mb")
    return {
        "run": name,
        "micro_batch": res.micro_batch,
        "gradient_accumulation_steps": res.gradient_accumulation_steps,
        "memory_budget_mb": res.memory_budget_mb,
        "reason": res.micro_batch_reason,
        "estimated_peak_mb": est,
        "measured_peak_mb": round(res.peak_memory_mb, 1),
        "torch_max_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "estimate_error": None if not est else round(res.peak_memory_mb / est - 1, 3),
        "steps": res.steps,
        "loss_fell": res.loss_history[-1][1] < res.loss_history[0][1],
    }


def sql_rows(n: int) -> list[str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.sql_task import make_rows

    return make_rows(n, 0, seed=1)[0]


ARM = (
    "import json, sys\n"
    "from pathlib import Path\n"
    "import torch\n"
    "from finetune_pipeline.training.sft import TrainRequest, fit, setup\n"
    "s = setup(TrainRequest.load(Path(sys.argv[1])), log=lambda m: None)\n"
    "f = fit(s)\n"
    "print('RESULT ' + json.dumps({'tokens_per_second': f.tokens / f.wall_seconds, 'steps': f.steps, "
    "'seconds_per_step': f.wall_seconds / max(1, f.steps), 'dtype': s.dtype, 'device': s.device, "
    "'peak_cuda_mb': torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))\n"
)


def speed_arm(tree: Path, base: Path, rows: list[str], work: Path, steps: int) -> dict[str, Any]:
    """One training run (``setup`` and ``fit``: the older tree's ``finalize`` fails on CUDA) in its own process (the request holds only the fields set here, so
    an older tree reads it too)."""
    from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec
    from finetune_pipeline.training.records import TrainRequest

    work.mkdir(parents=True, exist_ok=True)
    req = TrainRequest(
        base_path=str(base),
        model=ModelSpec(lora={"r": 16, "alpha": 32, "target_modules": "all-linear"}),
        training=TrainingSpec(max_steps=steps, per_device_train_batch_size=8, learning_rate=2e-4, seed=42),
        runtime=RuntimeSpec(logging_steps=1, save_steps=0, calibration_steps=0, eos_check_samples=0),
        train_messages=rows,
        eval_messages=[],
        output_dir=work / "out",
        save=False,
        measure_cost=True,
    )
    (work / "request.json").write_text(req.model_dump_json(exclude_unset=True, by_alias=True))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", ARM, str(work / "request.json")], cwd=tree, env=env, capture_output=True, text=True
    )
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode or line is None:
        return {"error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(line[len("RESULT ") :])


def speed_check(baseline: Path, base: Path, work: Path, steps: int, repeats: int) -> dict[str, Any]:
    """Today's asset (``baseline``) vs this tree's, alternating, on the SQL task and on short ticket chats."""
    here = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {}
    for task, data in {"sql": sql_rows(steps * 8), "tickets": rows(steps * 8)}.items():
        runs: dict[str, list[dict[str, Any]]] = {"today": [], "new": []}
        for i in range(repeats):
            for arm, tree in (("today", baseline), ("new", here)):
                r = speed_arm(tree, base, data, work / f"speed-{task}-{arm}-{i}", steps)
                print(f"[speed {task} {arm} #{i}] {r}", flush=True)
                runs[arm].append(r)
        row: dict[str, Any] = {"runs": runs}
        ok = {k: [r["tokens_per_second"] for r in v if "tokens_per_second" in r] for k, v in runs.items()}
        if ok["today"] and ok["new"]:
            row["today_tokens_per_second"] = statistics.median(ok["today"])
            row["new_tokens_per_second"] = statistics.median(ok["new"])
            row["ratio"] = round(row["new_tokens_per_second"] / row["today_tokens_per_second"], 3)
        out[task] = row
    return out


def qlora_merge_check(base: Path, adapter: Path) -> dict[str, Any]:
    """Adapter on the 4-bit base vs the adapter merged into (a) the dequantised 4-bit base, (b) the 16-bit base."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok("Ticket 3: printer 3 on floor 8 shows error E11. Which team?", return_tensors="pt").input_ids.cuda()
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    four = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        ref = PeftModel.from_pretrained(four, adapter).eval()(ids).logits.float()
    deq = AutoModelForCausalLM.from_pretrained(base, quantization_config=q, dtype=torch.bfloat16).cuda()
    deq = deq.dequantize()
    with torch.no_grad():
        merged_deq = PeftModel.from_pretrained(deq, adapter).merge_and_unload().eval()(ids).logits.float()
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        merged_16 = PeftModel.from_pretrained(full, adapter).merge_and_unload().eval()(ids).logits.float()
    # the project's own release path (models/merge.standalone_model: into the dequantised quantised base)
    from finetune_pipeline.models.merge import standalone_model
    from finetune_pipeline.spec import ModelSpec

    project, _ = standalone_model(str(base), ModelSpec(method="qlora", dtype="bfloat16"), str(adapter))
    project = project.to("cuda").eval()
    with torch.no_grad():
        ours = project(ids).logits.float()
    return {
        "project_merge_dtype": str(next(project.parameters()).dtype),
        "max_abs_logit_diff_project_merge": round((ours - ref).abs().max().item(), 4),
        "same_greedy_token_project_merge": bool((ours.argmax(-1) == ref.argmax(-1)).all().item()),
        "max_abs_logit_diff_dequantised_merge": round((merged_deq - ref).abs().max().item(), 4),
        "max_abs_logit_diff_16bit_merge": round((merged_16 - ref).abs().max().item(), 4),
        "same_greedy_token_dequantised": bool((merged_deq.argmax(-1) == ref.argmax(-1)).float().mean().item() == 1.0),
        "greedy_agreement_16bit": round((merged_16.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", nargs="*", help="run only these (e.g. qlora-nf4)")
    p.add_argument("--baseline-tree", type=Path, help="today's asset's source tree, for the speed check")
    p.add_argument("--speed-steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], help="parts to leave out: runs, merge, micro-batch, speed")
    a = p.parse_args()
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    a.work.mkdir(parents=True, exist_ok=True)
    base = smollm2_shaped(a.work / "base", a.tokenizer)
    results: dict[str, Any] = {"torch": torch.__version__, "runs": []}
    runs = [("lora-fp32", "lora", "float32"), ("lora-bf16", "lora", "bfloat16"), ("qlora-nf4", "qlora", "bfloat16")]
    for name, method, dtype in [r for r in runs if (not a.only or r[0] in a.only) and "runs" not in a.skip]:
        try:
            results["runs"].append(run_one(name, base, a.work, method, dtype, a.steps))
        except Exception as e:  # one failing path must not hide the others' figures
            results["runs"].append(
                {"run": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            )
        a.out.write_text(json.dumps(results, indent=2))
    if "merge" not in a.skip and "runs" not in a.skip:
        try:
            results["qlora_merge"] = qlora_merge_check(base, a.work / "qlora-nf4")
        except Exception as e:
            results["qlora_merge"] = {"error": f"{type(e).__name__}: {e}"}
        a.out.write_text(json.dumps(results, indent=2))
    if "micro-batch" not in a.skip:
        results["micro_batch"] = []
        for budget in (None, 0.0):  # 0.0: 1 MB under the estimate at 8 rows (the rule must step down to 4 x 2)
            try:
                if budget == 0.0:
                    budget = round(results["micro_batch"][0]["estimated_peak_mb"] - 1, 1)
                results["micro_batch"].append(micro_batch_check(base, a.work, budget))
            except Exception as e:
                results["micro_batch"].append(
                    {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
                )
            a.out.write_text(json.dumps(results, indent=2))
    if a.baseline_tree and "speed" not in a.skip:
        results["speed"] = speed_check(a.baseline_tree.resolve(), base, a.work, a.speed_steps, a.repeats)
        a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
