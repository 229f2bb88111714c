"""The training child process: ``python -m finetune_pipeline.training.child`` (or under ``accelerate launch``).

Started by the adapter asset through Dagster Pipes. It reads its request (a JSON file named in the Pipes extras,
or given as the first argument when run by hand), trains, streams progress lines into the Dagster run log as they
happen, and reports the materialization's metadata when it ends: the cost figures (``cost_metadata``: this report
is the only channel they reach the parent through) plus steps, resume, early stop, validation loss and the EOS
check. Only the main process of a multi-process launch talks to Dagster; all of them train. The process id is
written next to the request (``child.pid``) so an operator can see or stop the run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from finetune_pipeline.training.launch import PID_FILE


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def cost_metadata(res: Any) -> dict[str, Any]:
    """The numbers a user wants before paying for the next run (JSON-able, for Dagster metadata and MLflow)."""
    return {
        "learning_rate": res.learning_rate,
        "micro_batch": res.micro_batch,
        "gradient_accumulation_steps": res.gradient_accumulation_steps,
        "memory_budget_mb": None if res.memory_budget_mb is None else round(res.memory_budget_mb, 1),
        "tokens_per_second": round(res.tokens_per_second, 1),
        "train_tokens": res.train_tokens,
        "wall_seconds": round(res.wall_seconds, 1),
        "estimated_seconds": None if res.estimated_seconds is None else round(res.estimated_seconds, 1),
        "peak_memory_mb": round(res.peak_memory_mb, 1),
        "trainable_params": res.trainable_params,
        "flops_per_token": res.flops_per_token,
        "prefix_tokens_saved": res.prefix_tokens_saved,
        "achieved_tflops": round(res.achieved_tflops, 4),
        "matmul_peak_tflops": None if res.matmul_peak_tflops is None else round(res.matmul_peak_tflops, 4),
        "flop_utilisation": None if res.flop_utilisation is None else round(res.flop_utilisation, 4),
        "dtype": res.dtype,
        "device": res.device,
        "num_processes": res.num_processes,
        "planned_steps": res.planned_steps,
        "budget_steps": res.budget_steps,
        "epochs_trained": None if res.epochs_trained is None else round(res.epochs_trained, 3),
        "budget_epochs": None if res.budget_epochs is None else round(res.budget_epochs, 3),
        "budget_warmup_steps": res.budget_warmup_steps,
        "best_step": res.best_step,
        "estimated_peak_memory_mb": round(res.memory_estimate_mb.get("total_mb", 0.0), 1),
        "memory_estimate_error": round(res.peak_memory_mb / res.memory_estimate_mb["total_mb"] - 1, 3)
        if res.memory_estimate_mb.get("total_mb")
        else None,
        **{k: v for k, v in res.dtype_choice.items() if k != "dtype"},
    }


def main(argv: list[str] | None = None) -> int:
    from dagster_pipes import PipesContext, open_dagster_pipes

    from finetune_pipeline.training.sft import TrainRequest, train

    argv = sys.argv[1:] if argv is None else argv
    main_process = _rank() == 0
    use_pipes = "DAGSTER_PIPES_CONTEXT" in os.environ and main_process
    with open_dagster_pipes() if use_pipes else contextlib.nullcontext() as pipes:
        ctx: PipesContext | None = pipes
        request_path = Path(argv[0]) if argv else Path(str(ctx.get_extra("request"))) if ctx else None
        if request_path is None:
            raise SystemExit("usage: python -m finetune_pipeline.training.child REQUEST.json")
        req = TrainRequest.load(request_path)
        if main_process:
            (request_path.parent / PID_FILE).write_text(str(os.getpid()))

        def log(msg: str) -> None:
            if ctx is not None:
                ctx.log.info(msg)
            elif main_process:
                print(msg, flush=True)

        res = train(req, log=log)
        if ctx is not None:
            ctx.report_asset_materialization(
                metadata={
                    **cost_metadata(res),
                    "steps": res.steps,
                    "resumed_from_step": res.resumed_from_step,
                    "stopped_early": res.stopped_early,
                    "eval_loss": None if res.eval_loss != res.eval_loss else res.eval_loss,
                    "eos_rate": res.eos_rate,
                    "chat_template": res.chat_template_source,
                    "eos_token": res.eos_token,
                    "end_of_turn_share_failing": res.eot_contract.get("share_failing"),
                }
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
