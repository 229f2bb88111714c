"""The sweep-trial child process: ``python -m finetune_pipeline.tuning.trial_child REQUEST.json``.

Started by the sweep (through Dagster Pipes when run by the asset: its log lines stream into the Dagster run). It
trains one trial, reporting validation losses to the trial in the shared Optuna storage (so the pruner can stop it
early), and writes ``trial_outcome.json`` next to the request, which the parent reads to tell the study.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from dagster_pipes import open_dagster_pipes

    from finetune_pipeline.tuning.trials import TrialOutcome, TrialRequest, outcome_path, run_trial

    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m finetune_pipeline.tuning.trial_child REQUEST.json")
    request = Path(argv[0])
    req = TrialRequest.load(request)
    pipes = open_dagster_pipes() if "DAGSTER_PIPES_CONTEXT" in os.environ else contextlib.nullcontext()
    with pipes as ctx:

        def log(msg: str) -> None:
            line = f"trial {req.number}: {msg}"
            ctx.log.info(line) if ctx is not None else print(line, flush=True)

        try:
            out = run_trial(req, log)
        except Exception as exc:  # recorded as a failed trial; the parent tells the study and goes on
            log(traceback.format_exc())
            out = TrialOutcome(number=req.number, state="FAIL", error=f"{type(exc).__name__}: {exc}")
        out.save(outcome_path(request))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
