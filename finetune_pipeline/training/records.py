"""The records of a training run: the request (``request.json``) the adapter asset, the sweep and the child hand to
``sft.train``, the result (``train_result.json``) it writes, and the file names a run leaves. Plain pydantic records:
no torch, no transformers, so that the callbacks, the child and the stages import them without importing ``sft``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from finetune_pipeline.layout import Record
from finetune_pipeline.spec import ModelSpec, RuntimeSpec, TrainingSpec

COMPLETE = "CHECKPOINT_COMPLETE"  # written into a checkpoint folder once everything in it is on disk
DATA_ORDER = "data_order.jsonl"
RESULT_FILE = "train_result.json"  # written into the request's output_dir


class TrainRequest(Record):
    """One training run: the final model / training / runtime settings and the data (``request.json``).

    The flag ``save`` (write the model and the result to ``output_dir``) is the attribute ``save_outputs``: the name
    ``save`` is the method that writes the request. Construct and serialise it as ``save``.
    """

    model_config = ConfigDict(
        extra="forbid",
        ser_json_inf_nan="constants",
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )
    base_path: str
    model: ModelSpec
    training: TrainingSpec
    runtime: RuntimeSpec = RuntimeSpec()
    train_messages: list[str]  # JSON-encoded message lists
    eval_messages: list[str]
    output_dir: Path
    save_outputs: bool = Field(True, alias="save")
    checkpoint_dir: Path | None = None  # checkpoints every runtime.save_steps; resume from the last complete one
    spec_dir: str | None = None  # resolves a relative training.chat_template
    measure_cost: bool = False  # matmul peak, FLOP utilisation and the EOS check (the adapter asset turns it on)
    eos_max_new_tokens: int = 48
    memory_budget_mb: float | None = None  # the micro-batch rule's budget; None: measured on the machine that trains


class TrainResult(Record):
    """What a run did and cost (``train_result.json``). ``eval_loss`` is NaN when there was no validation data."""

    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")  # older results may hold more fields

    output_dir: str
    method: str
    steps: int
    loss_history: list[tuple[int, float]]
    eval_loss: float
    train_tokens: int  # non-padding tokens seen in this session
    wall_seconds: float
    tokens_per_second: float
    cpu_seconds: float  # CPU time of this process while training (all threads): robust to other load
    trainable_params: int
    total_params: int
    lora_tensors_changed: int
    lora_tensors_total: int
    resumed_from_step: int = 0
    stopped_early: bool = False
    eval_history: list[tuple[int, float]] = []
    learning_rate: float | None = None  # the peak rate used (the spec's, or default_learning_rate's)
    dtype: str = "float32"
    device: str = "cpu"
    peak_memory_mb: float = 0.0
    estimated_seconds: float | None = None
    seconds_per_step: float | None = None
    flops_per_token: float = 0.0
    prefix_tokens_saved: int = 0  # tokens a shared prefix did not compute again (training.share_prefix)
    achieved_tflops: float = 0.0
    matmul_peak_tflops: float | None = None
    flop_utilisation: float | None = None
    chat_template_source: str = "model"
    eos_token: str = ""
    eos_rate: float | None = None
    eos_samples: list[dict[str, Any]] = []
    reproducibility: dict[str, Any] = {}
    num_processes: int = 1
    planned_steps: int = 0  # from max_steps or num_train_epochs, before any time budget
    budget_steps: int | None = None  # the step count training.max_minutes allowed (None: no budget, or it fit)
    epochs_trained: float | None = None  # passes over the training rows (or packed sequences) the run made
    budget_epochs: float | None = None  # passes over the training rows training.max_minutes buys at the measured pace
    budget_warmup_steps: int | None = None  # warm-up of the schedule rescaled to the budget's steps
    dtype_choice: dict[str, Any] = {}  # requested dtype, the one used, why, and the matmul GFLOP/s measured per dtype
    eot_contract: dict[str, Any] = {}  # the end-of-turn check on the tokenised training rows
    best_step: int | None = None  # the step whose weights were kept (best validation loss), when validating
    memory_estimate_mb: dict[str, float] = {}  # estimated peak before training, by part
    micro_batch: int | None = None  # examples per device per forward/backward pass actually used
    gradient_accumulation_steps: int | None = None  # micro-batches per optimizer step actually used
    micro_batch_reason: str = ""  # how the micro-batch was chosen (the spec's, the memory estimate, the checkpoint)
    memory_budget_mb: float | None = None  # the budget the memory estimate was held against, when it chose
