"""CUDA paths of the training recipe, checked on a lent GPU (no GPU in CI: this is run by hand on one).

What it runs, each through the project's own ``training.sft.train`` (setup -> fit -> finalize):
  lora-bf16   LoRA r16 all-linear, weights bf16
  qlora-nf4   QLoRA: base 4-bit nf4 (bitsandbytes, double quant), compute bf16
  lora-fp32   the same LoRA in float32, as the baseline of the bf16 speed ratio
on a SmolLM2-135M-shaped llama (random init: the weights cannot travel to the GPU machine; the shapes, the kernels
and the memory are what is checked), with the packaged SmolLM2 tokenizer. Per run: loss falling, every LoRA tensor
changed, tokens/s, peak CUDA memory. Then the QLoRA merge rule: the adapter folded into the DEQUANTISED 4-bit base
gives the logits of the adapter on the 4-bit base (a merge into the original 16-bit weights does not).

    python bench/gpu_check.py --tokenizer DIR --out results.json     # DIR: a saved SmolLM2 tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
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
    a = p.parse_args()
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    a.work.mkdir(parents=True, exist_ok=True)
    base = smollm2_shaped(a.work / "base", a.tokenizer)
    results: dict[str, Any] = {"torch": torch.__version__, "runs": []}
    runs = [("lora-fp32", "lora", "float32"), ("lora-bf16", "lora", "bfloat16"), ("qlora-nf4", "qlora", "bfloat16")]
    for name, method, dtype in [r for r in runs if not a.only or r[0] in a.only]:
        try:
            results["runs"].append(run_one(name, base, a.work, method, dtype, a.steps))
        except Exception as e:  # one failing path must not hide the others' figures
            results["runs"].append(
                {"run": name, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
            )
        a.out.write_text(json.dumps(results, indent=2))
    try:
        results["qlora_merge"] = qlora_merge_check(base, a.work / "qlora-nf4")
    except Exception as e:
        results["qlora_merge"] = {"error": f"{type(e).__name__}: {e}"}
    a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
