"""The script a user would write without finetune_pipeline: trl's SFTTrainer with LoRA on the same model and data.

Run by bench/train_bench.py as a child process (one model per process, like the asset's child):
    python bench/bare_trl.py REQUEST.json  ->  prints one JSON line with tokens/s and the loss history.
REQUEST: {"base_path", "rows": [messages...], "steps", "batch", "lr", "max_length", "dtype": "float32"|"bfloat16",
          "lora_r", "lora_alpha", "seed", "out"}
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    req = json.loads(open(sys.argv[1]).read())
    rows = [json.loads(m) for m in req["rows"]]
    ds = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in rows])
    tok = AutoTokenizer.from_pretrained(req["base_path"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[req["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(req["base_path"], dtype=dtype)
    args = SFTConfig(
        output_dir=req["out"],
        max_steps=req["steps"],
        per_device_train_batch_size=req["batch"],
        learning_rate=req["lr"],
        max_length=req["max_length"],
        seed=req["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=req.get("gradient_checkpointing", True),  # trl's default is True
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    peft = LoraConfig(
        r=req["lora_r"],
        lora_alpha=req["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = int(trainer.state.num_input_tokens_seen)
    trainer.model.save_pretrained(req["out"] + "/adapter", safe_serialization=True)
    print(
        json.dumps(
            {
                "tokens_per_second": tokens / wall,
                "train_tokens": tokens,
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "loss_history": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
                "adapter": req["out"] + "/adapter",
            }
        )
    )


if __name__ == "__main__":
    main()
