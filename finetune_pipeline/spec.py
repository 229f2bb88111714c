"""The pipeline spec: one YAML file per fine-tuning pipeline, validated up front.

Every problem in a spec is reported at once, each with its field path and YAML line
(``specs/x.yaml:14: model.lora.r: must be > 0``). Field names follow peft / trl / axolotl
(``lora.r``, ``lora.alpha``, ``target_modules``, ``learning_rate``, ``max_length``, ``packing``).
No dagster import here: tests and other entry points use the spec directly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from finetune_pipeline.hashing import short_hash

MetricName = Literal[
    "exact_match",
    "token_f1",
    "bleu",
    "chrf",
    "rouge_1",
    "rouge_2",
    "rouge_l",
    "json_valid",
    "json_schema",
    "field_accuracy",
    "perplexity",
]
# Searchable (sweep) parameters: the name a search space uses -> where the value lives in the spec.
SEARCHABLE_PARAMS: dict[str, tuple[str, ...]] = {
    "learning_rate": ("training", "learning_rate"),
    "per_device_train_batch_size": ("training", "per_device_train_batch_size"),
    "gradient_accumulation_steps": ("training", "gradient_accumulation_steps"),
    "warmup_ratio": ("training", "warmup_ratio"),
    "weight_decay": ("training", "weight_decay"),
    "lora.r": ("model", "lora", "r"),
    "lora.alpha": ("model", "lora", "alpha"),
    "lora.dropout": ("model", "lora", "dropout"),
}
# Fields that moved to another section: an old spec gets told where they went.
MOVED_FIELDS: dict[tuple[str, str], str] = {
    **{
        ("training", f): f"runtime.{f}"
        for f in (
            "logging_steps",
            "save_steps",
            "save_total_limit",
            "calibration_steps",
            "min_eos_rate",
            "eos_check_samples",
            "launcher",
        )
    },
    ("evaluation", "min_improvement_over_base"): "registry.min_improvement_over_base",
}


NO_SOURCE = "give either source (one source) or sources (a list of named sources), not both"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ColumnMap(_Strict):
    """Names of the fields in the dropped files, per record format (defaults follow the common conventions)."""

    messages: str = Field("messages", description="chat: list of {role, content} messages.")
    role: str = Field("role", description="chat: key of a message's role (system, user, assistant).")
    content: str = Field("content", description="chat: key of a message's text.")
    conversations: str = Field("conversations", description="sharegpt: list of {from, value} turns.")
    sharegpt_role: str = Field("from", description="sharegpt: key of a turn's speaker (human, gpt, system, ...).")
    sharegpt_content: str = Field("value", description="sharegpt: key of a turn's text.")
    instruction: str = Field("instruction", description="alpaca: the instruction.")
    input: str = Field("input", description="alpaca: optional input appended to the instruction.")
    output: str = Field("output", description="alpaca: the answer to learn.")
    system: str = Field("system", description="alpaca / prompt_completion: optional system prompt.")
    prompt: str = Field("prompt", description="prompt_completion: the prompt.")
    completion: str = Field("completion", description="prompt_completion: the answer to learn.")
    text: str = Field("text", description="text: plain text (continued pre-training style, no prompt).")
    id: str | None = Field("id", description="Stable row id; rows without one get a hash of their content as id.")
    label: str | None = Field(None, description="Label column (for stratified splits and the label-mix drift).")
    timestamp: str | None = Field(None, description="Timestamp column (ISO 8601 or epoch seconds; temporal splits).")


DEFAULT_ROLES: dict[str, str] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
_HOOK = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*")


class LabelSpec(_Strict):
    """How labels are normalised before the stratified split, the label checks and the label drift."""

    strip: bool = Field(False, description="Trim spaces around each label (' Billing ' -> 'Billing').")
    lowercase: bool = Field(False, description="Lower-case each label ('Billing' -> 'billing').")
    mapping: dict[str, str] = Field(
        default_factory=dict,
        description="Labels renamed after strip/lowercase, e.g. {bill: billing, invoice: billing}; keys are matched "
        "after the same strip/lowercase; a label mapped to '' counts as missing.",
    )
    unmapped: Literal["keep", "quarantine"] = Field(
        "keep",
        description="With a mapping: keep = labels not in it stay as they are; quarantine = rows whose label is "
        "neither a mapping key nor a mapping value are quarantined (reason unknown_label).",
    )

    @property
    def active(self) -> bool:
        return self.strip or self.lowercase or bool(self.mapping)


class SourceSpec(_Strict):
    name: str = Field(
        "default",
        description="Name of the source (letters, digits, underscores): each drop remembers it, and the mix and the "
        "metadata report per source. Must be unique among sources.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Share of this source's training rows in the training mix: 1 = as they are, 2 = each training "
        "row twice (oversampled), 0.5 = half of them (a fixed hash-chosen subset). Applied after dedup and after the "
        "splits are fixed: validation and test rows are never copied or dropped.",
    )
    max_rows: int | None = Field(
        None,
        ge=1,
        description="Cap on this source's rows in the training mix (after weight); None = no cap.",
    )
    incoming_dir: str = Field(
        description="Folder watched for new data files; each file becomes one partition of raw_dataset. "
        "Relative paths are resolved against the spec file's folder."
    )
    file_format: Literal["auto", "jsonl", "json", "csv", "parquet"] = Field(
        "auto",
        description="File format: jsonl, json (an array, or an object holding one), csv, parquet; "
        "auto = by extension (.jsonl/.ndjson, .json, .csv, .parquet/.pq).",
    )
    record_format: Literal["auto", "chat", "sharegpt", "alpaca", "prompt_completion", "text", "mixed"] = Field(
        "auto",
        description="Record format: chat (role/content messages), sharegpt (from/value conversations), alpaca "
        "(instruction/input/output), prompt_completion, text; auto = detected from the fields of the first records "
        "(the run log says what it found; when unsure it asks for this field); mixed = each record is read in the "
        "format its own fields show (for files that mix the formats above).",
    )
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Field names in the files (column mapping).")
    labels: LabelSpec = Field(
        default_factory=LabelSpec,
        description="Normalisation of the label column (columns.label) while cleaning, before the stratified split, "
        "the label checks and the label drift: strip, lowercase, a mapping table; off by default.",
    )
    json_records_key: str | None = Field(
        None,
        description="json files holding an object: the key of the list(s) of records (auto when the object has "
        "exactly one list). Every list under this key, at any depth, is read; when the key also occurs inside "
        "records (ambiguous), the file stops with the places it occurs.",
    )
    json_records: Literal["auto", "values"] = Field(
        "auto",
        description="json files holding an object: values = the object's values are the records and each key is "
        'the row id (id-keyed exports such as {"conv1": {"messages": [...]}, ...}; a record that has the '
        "columns.id field keeps its own); auto = the same when every value is an object that is not itself a record "
        "field set, else the list under json_records_key (or the object's only list). The run log says which.",
    )
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=dict,
        description="Speaker names mapped to roles (case-insensitive), added to the defaults "
        f"{', '.join(f'{k}: {v}' for k, v in DEFAULT_ROLES.items())}; e.g. {{bot: assistant, customer: user}}. "
        "Applies to chat and sharegpt records.",
    )
    leading_assistant: Literal["quarantine", "drop", "context"] = Field(
        "context",
        description="Conversations that begin (after an optional system message) with assistant turns, such as "
        "ShareGPT continuation chunks: context = keep those turns, without loss, as context in the system message "
        "(not trained on); drop = remove them; quarantine = reject the row as misordered_roles.",
    )
    record_hook: str | None = Field(
        None,
        description="'module:function' (importable, e.g. from PYTHONPATH) called with each raw record (the parsed "
        "JSON object, CSV row or Parquet row) and returning its messages: a list of {role, content}. For custom or "
        "nested formats; a record it raises on or returns nothing usable for is quarantined as hook_failed.",
    )
    file_glob: str = Field("*.jsonl", description="Glob selecting data files inside incoming_dir.")
    settle_seconds: float = Field(
        2.0, ge=0, description="A file must be unchanged (size and mtime) for this long before it is ingested."
    )
    done_marker: str | None = Field(
        None,
        description="Optional completion marker written by the producer: a name with {name} (e.g. '{name}.done': "
        "data.jsonl is ingested once data.jsonl.done exists) or a folder marker (e.g. '_SUCCESS': files are "
        "ingested once it exists and is newer than them). Marker files are never ingested.",
    )
    incomplete_grace_seconds: float = Field(
        600.0,
        ge=0,
        description="A file that looks unfinished (a JSONL whose last line has no newline, a JSON document that "
        "does not parse to its end, a Parquet file without its footer) waits; once unchanged this long it is "
        "ingested anyway and its cut tail quarantined.",
    )
    wait_for_writers: bool = Field(
        True,
        description="Wait while a process holds the file open for writing (Linux: read from /proc/*/fd; best "
        "effort, sees only processes this user may inspect).",
    )

    @field_validator("record_hook")
    @classmethod
    def _hook(cls, v: str | None) -> str | None:
        if v is not None and not _HOOK.fullmatch(v):
            raise ValueError("must be 'module:function', e.g. my_formats:to_messages")
        return v

    @field_validator("done_marker")
    @classmethod
    def _marker(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v):
            raise ValueError("must be a file name such as '{name}.done' or '_SUCCESS'")
        return v

    @field_validator("name")
    @classmethod
    def _source_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", v):
            raise ValueError("must start with a letter and contain only letters, digits and underscores")
        return v

    @model_validator(mode="after")
    def _labels_need_column(self) -> SourceSpec:
        if self.labels.active and not self.columns.label:
            raise ValueError("labels (normalisation) needs columns.label (the label column)")
        return self

    def role_map(self) -> dict[str, str]:
        """The default speaker aliases plus this spec's ``roles``, keys lower-cased."""
        return {**DEFAULT_ROLES, **{k.lower(): v for k, v in self.roles.items()}}


class QualitySpec(_Strict):
    enabled: bool = Field(True, description="Score every row and quarantine those below min_score.")
    min_score: float = Field(
        0.5, ge=0, le=1, description="Rows scoring below this are quarantined (reason low_quality)."
    )
    markers: list[str] = Field(
        default_factory=lambda: ["I cannot", "I can't", "As an AI", "TODO", "FIXME", "lorem ipsum"],
        description="Refusal / placeholder markers searched (case-insensitive) in the assistant answers.",
    )


PiiKind = Literal["email", "phone", "card", "secret"]


class PiiSpec(_Strict):
    mode: Literal["off", "mask", "report"] = Field(
        "off",
        description="off; mask = replace each finding in the message text by [EMAIL] / [PHONE] / [CARD] / [SECRET] "
        "before hashing and dedup (the cleaned rows, splits and previews never hold it); report = leave the text as "
        "it is and only count and list the affected rows (previews masked).",
    )
    kinds: list[PiiKind] = Field(
        default_factory=lambda: ["email", "phone", "card", "secret"],
        description="What to look for: email addresses, phone numbers (libphonenumber), card numbers (Luhn-checked), "
        "secrets (API keys, tokens, private keys: detect-secrets' patterns).",
    )
    phone_region: str = Field(
        "US",
        description="Region (ISO 3166 code) in which phone numbers written without a +country code are read.",
    )

    @field_validator("phone_region")
    @classmethod
    def _region(cls, v: str) -> str:
        import phonenumbers

        if v.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"unknown region {v!r}: use a two-letter ISO 3166 code such as US, GB, DE, IN")
        return v.upper()


class CleaningSpec(_Strict):
    normalize_whitespace: bool = Field(
        True, description="CRLF to LF, collapse runs of spaces/tabs, trim spaces around line breaks and the ends."
    )
    min_assistant_chars: int = Field(1, ge=0, description="Reject rows whose final assistant answer is shorter.")
    min_total_chars: int = Field(0, ge=0, description="Reject rows whose messages together are shorter.")
    max_total_chars: int = Field(20_000, gt=0, description="Reject rows whose messages together are longer.")
    min_tokens: int | None = Field(
        None, ge=0, description="Reject rows with fewer tokens (base model's tokenizer, chat template applied)."
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Reject rows with more tokens (base model's tokenizer, chat template applied)."
    )
    quality: QualitySpec = Field(default_factory=QualitySpec, description="Quality score and its threshold.")
    pii: PiiSpec = Field(
        default_factory=PiiSpec,
        description="Personal data and secrets in the messages: masked in place, or reported only; counts per kind "
        "and the affected rows in cleaned_dataset's metadata. Off by default.",
    )
    max_rejection_rate: float = Field(
        0.05, ge=0, le=1, description="Blocking check: fraction of a drop's rows that may be quarantined."
    )


class DedupSpec(_Strict):
    near: bool = Field(True, description="Remove near-duplicates (MinHash LSH) within and across drops.")
    near_threshold: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Word n-gram Jaccard similarity at or above which two rows are near-duplicates: the prompt side "
        "and the answer side are compared separately (boilerplate excluded) and both must reach it.",
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations.")
    ngram: int = Field(3, ge=1, le=10, description="Word n-gram (shingle) size.")
    boilerplate_share: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Shingles found in more than this share of the rows (a shared system prompt, context, schema or "
        "few-shot header) are ignored when comparing rows; 1 = compare everything.",
    )
    conflicts: Literal["keep_all", "keep_first", "quarantine"] = Field(
        "keep_all",
        description="Rows whose prompts are equal or near-equal (near_threshold) but whose answers differ are label "
        "conflicts, always reported: keep_all keeps them, keep_first keeps the earliest, quarantine removes all of "
        "them (reason 'conflict').",
    )


class SplitSpec(_Strict):
    method: Literal["random", "stratified", "temporal"] = Field(
        "random",
        description="random: by a hash of (salt, row id); stratified: each label keeps the fractions "
        "(source.columns.label); temporal: the newest rows of each drop go to test, then validation "
        "(source.columns.timestamp). In every method a row's split never changes once assigned.",
    )
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of rows assigned to validation.")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="Share of rows assigned to test.")
    salt: str = Field(
        "split-v1", description="Salt of the per-row hash that fixes each row's split; change it to reshuffle."
    )
    min_train_rows: int | None = Field(
        None,
        ge=1,
        description="Blocking (data_readiness): training does not start with fewer training rows. None = off.",
    )
    min_test_rows: int | None = Field(
        None, ge=1, description="Blocking (data_readiness): training does not start with fewer test rows. None = off."
    )

    @model_validator(mode="after")
    def _fractions(self) -> SplitSpec:
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must be < 1 so that rows remain for training")
        return self


class DriftSpec(_Strict):
    enabled: bool = Field(True, description="Compare each new drop with the current training split.")
    warn_threshold: float = Field(
        0.25, ge=0, le=1, description="The drift check warns when the drop's drift score reaches this."
    )
    retrain_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="When set, the retraining schedule retrains only when a new drop's drift score reaches this "
        "(instead of on any new data).",
    )


class LoraSpec(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank (peft LoraConfig.r).")
    alpha: int = Field(32, gt=0, description="LoRA scaling numerator (peft lora_alpha).")
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the LoRA path (peft lora_dropout). 0 (the default) runs no dropout op: with 0.05 peft "
        "drops out a copy of every adapted layer's input, which made a CPU training step 1.5x slower here; set "
        "0.05-0.1 when a long multi-epoch run on a small set overfits.",
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear' (every linear layer but the output head, found per architecture "
        "by peft) or a list of module names such as [q_proj, v_proj] (peft target_modules).",
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA, peft use_dora): slower per step.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r) (peft use_rslora).")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases train with the adapter (peft bias): none, all, or lora_only."
    )
    modules_to_save: list[str] | None = Field(
        None,
        description="Modules trained in full and saved next to the adapter (peft modules_to_save), e.g. [lm_head, "
        "embed_tokens] when new tokens were added.",
    )

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or any(not m.strip() for m in v)):
            raise ValueError("needs at least one module name, e.g. [q_proj, v_proj], or 'all-linear'")
        return v


class ModelSpec(_Strict):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a packaged name (smollm2-135m-instruct, offline), a local folder, or a hub id.",
    )
    method: Literal["lora", "qlora", "full"] = Field(
        "lora", description="lora, qlora (quantised base via bitsandbytes, see quantization) or full fine-tuning."
    )
    quantization: Literal["nf4", "int8"] = Field(
        "nf4",
        description="QLoRA base quantisation: nf4 (4-bit NormalFloat with double quantisation) or int8 "
        "(bitsandbytes 8-bit). Used only with method: qlora.",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings for lora / qlora.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype the base weights are loaded in for training and evaluation. 'auto' = measured on the "
        "machine: bfloat16 on a CUDA GPU that supports it; on a CPU bfloat16 only when its matmul runs at least 1.5x "
        "as fast as float32 there (a short timing per dtype, recorded with the run), else float32. An explicit "
        "bfloat16/float16 that the CPU runs more than 1.25x slower than float32 stops the training with the "
        "measured slowdown (see allow_slow_dtype).",
    )
    allow_slow_dtype: bool = Field(
        False,
        description="Run an explicit dtype even where the hardware computes it far slower than float32 (e.g. "
        "bfloat16 on a CPU without AVX512-BF16, often ~50x slower). Off: such a spec stops before training.",
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub. Off by default: only enable for repositories you trust."
    )


class TrainingSpec(_Strict):
    max_steps: int | None = Field(
        60,
        gt=0,
        description="Optimizer steps for the adapter (trl SFTConfig.max_steps). Left out when num_train_epochs is "
        "given (giving both is an error).",
    )
    num_train_epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the training split instead of a fixed max_steps: the step count follows the data "
        "as new drops arrive (steps = ceil(epochs x rows / effective batch)).",
    )
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Time budget of the training itself: after runtime.calibration_steps timed steps, the step "
        "count is capped to what fits (logged, and stored as budget_steps); the learning-rate schedule is "
        "rescaled to end there. Needs runtime.calibration_steps > 0.",
    )
    per_device_train_batch_size: int | None = Field(
        None,
        gt=0,
        description="Examples per device per forward/backward pass (the micro-batch). Left out with "
        "gradient_accumulation_steps also left out: the effective batch is 8 per device and the micro-batch is the "
        "largest of 8, 4, 2, 1 whose estimated peak memory fits the memory budget (CUDA: (free device memory + what "
        "this process holds) x 0.9; CPU: (MemAvailable + this process's resident memory) x 0.8), accumulating "
        "8 / micro-batch passes, so the learning is unchanged (training.configs.choose_micro_batch; logged and "
        "recorded as micro_batch). Left out with gradient_accumulation_steps set: 8.",
    )
    gradient_accumulation_steps: int | None = Field(
        None,
        gt=0,
        description="Micro-batches accumulated per optimizer update. Left out: 1 when per_device_train_batch_size "
        "is set; with both left out, chosen with the micro-batch from the memory estimate (8 / micro-batch).",
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate. Left out: chosen from the model's size, the method and the effective batch "
        "(training.configs.default_learning_rate: LoRA / QLoRA 2e-4 x sqrt(7e9 / parameters) x sqrt(effective batch "
        "/ 16) within [2e-5, 2e-3], which gives 1e-3 for a 135M model at batch 8 and 2e-4 for a 7B one at batch 16; "
        "full fine-tuning 1e-5 x the same factors within [1e-6, 1e-4]); the run log and the adapter's metadata say "
        "the value used.",
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps used for warm-up.")
    warmup_steps: int | None = Field(
        None, ge=0, description="Warm-up steps; when given it replaces warmup_ratio (trl warmup_steps)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 = no clipping).")
    optim: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adafactor",
        "sgd",
        "adamw_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "paged_lion_8bit",
    ] = Field(
        "adamw_torch",
        description="Optimizer (transformers' optim names). The 8-bit and paged ones (bitsandbytes) need CUDA: "
        "on a CPU the run stops before training and names the alternative.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass: less memory, ~30% more compute. Off by default "
        "(trl turns it on by default; with small models and batches it only costs time).",
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel while training (transformers attn_implementation). auto: eager on a CPU when "
        "max_length <= 1024 (PyTorch's CPU flash-attention backward is slow on short rows: eager measured 1.2-1.25x "
        "faster per step at 80-200 tokens a row), sdpa otherwise and on CUDA (eager keeps every attention matrix "
        "for the backward pass: memory grows with max_length squared). Evaluation and serving use the model's "
        "default.",
    )
    half_precision_lora: bool = Field(
        True,
        description="With bfloat16 / float16 base weights, run the LoRA layers in that dtype (autocast) instead of "
        "peft's float32 copies of every adapted layer's input; the adapter's weights and optimizer state stay "
        "float32. No effect in float32.",
    )
    share_prefix: bool = Field(
        True,
        description="When every row of a micro-batch begins with the same unlabelled tokens (a fixed system prompt "
        "or schema), compute that prefix once: the batch runs as one sequence (the prefix, then each row's own "
        "tokens at their own positions; each row attends to the prefix and to itself), with the padded batch's loss "
        "and gradients and no more activation memory. Used where it saves at least 15% of the step's FLOPs, with "
        "eager / sdpa attention in a plain-attention family (llama, mistral, qwen2, qwen3, phi3, granite, olmo2, "
        "smollm3), no attention or LoRA dropout and no gradient checkpointing; other batches train padded.",
    )
    nan_guard: bool = Field(
        True,
        description="Stop with an error when the training loss becomes NaN/inf or diverges (above 4x the lowest "
        "loss seen and above the first loss) instead of finishing a broken run.",
    )
    max_length: int = Field(512, gt=0, description="Longest tokenised example; longer ones are truncated.")
    packing: bool = Field(False, description="Pack several examples into one sequence (trl packing, bfd strategy).")
    padding_free: bool = Field(
        False,
        description="Concatenate the batch into one row without padding (trl padding_free); attention stays per "
        "example. Implied by packing. Without packing, trl does not truncate to max_length: bound rows with "
        "cleaning.max_tokens.",
    )
    assistant_only_loss: bool = Field(
        True,
        description="Loss on every assistant turn only (trl assistant_only_loss), using a chat template with "
        "{% generation %} markers (see chat_template). Off: completion_only_loss decides.",
    )
    completion_only_loss: bool = Field(
        True, description="With assistant_only_loss off: loss on the final assistant answer only (prompt/completion)."
    )
    chat_template: str = Field(
        "auto",
        description="Chat template used for training, saved with the adapter and used by eval and the registry: "
        "'auto' = the model's own if it has {% generation %} markers, else the known marked template that renders "
        "exactly the model's own template's text on probe chats (chatml-smollm2, chatml, qwen2.5, llama3, "
        "llama3.1, llama3.2, mistral, gemma, gemma3, phi3, phi3.5); or one of those names (verified the same way); "
        "or a path to a .jinja file (relative to the spec file).",
    )
    eval_steps: int = Field(
        0, ge=0, description="Evaluate on the validation split every N steps (0 = only at the end)."
    )
    max_eval_samples: int = Field(128, gt=0, description="Validation rows used for the validation loss.")
    seed: int = Field(42, description="Seed for data order and adapter initialisation.")
    early_stopping_patience: int = Field(
        0,
        ge=0,
        description="Stop after this many evaluations without a validation-loss improvement (0 = off; needs eval_steps).",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="Smallest drop in validation loss that counts as an improvement."
    )
    num_processes: int = Field(
        1,
        gt=0,
        description="Data-parallel processes (needs runtime.launcher: accelerate). A learning setting: the effective "
        "batch is per_device_train_batch_size x gradient_accumulation_steps x num_processes (8 x num_processes "
        "when both are left out).",
    )

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_steps(cls, data: Any) -> Any:
        """``num_train_epochs`` given without ``max_steps``: the default step count does not apply."""
        if isinstance(data, dict) and data.get("num_train_epochs") is not None and "max_steps" not in data:
            return {**data, "max_steps": None}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.max_steps is not None and self.num_train_epochs is not None:
            raise ValueError("give max_steps or num_train_epochs, not both (set max_steps: null to train by epochs)")
        if self.max_steps is None and self.num_train_epochs is None:
            raise ValueError("needs max_steps or num_train_epochs")
        if self.early_stopping_patience and not self.eval_steps:
            raise ValueError("early_stopping_patience needs eval_steps > 0 (validation loss is what it watches)")
        return self


class K8sSpec(_Strict):
    """Where the training child runs with ``runtime.launcher: k8s`` (dagster-k8s' Pipes client starts a pod)."""

    image: str = Field(
        description="Container image with this project installed (the same version as the Dagster code)."
    )
    namespace: str = Field("default", description="Kubernetes namespace of the training pod.")
    state_pvc: str = Field(
        description="PersistentVolumeClaim holding the state root (FINETUNE_HOME); it is mounted in the pod at the "
        "same path, so the request, checkpoints and adapter are where the Dagster side expects them."
    )
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu limit of the training container (0 = CPU only).")
    service_account: str | None = Field(None, description="Service account of the pod (default: the namespace's).")


class RuntimeSpec(_Strict):
    """How a training run is launched and observed. None of it changes what is learned, so none of it is part of
    the adapter's cache key: changing it never retrains."""

    logging_steps: int = Field(5, gt=0, description="Log loss every N steps (into the Dagster run and MLflow).")
    save_steps: int = Field(
        50,
        ge=0,
        description="Checkpoint every N steps under the state root; a killed run resumes from the last one "
        "(0 = no checkpoints).",
    )
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept on disk (older ones are deleted).")
    calibration_steps: int = Field(
        3,
        ge=0,
        description="Steps timed at the start of the run to estimate its total time (logged before the long part; 0 = off).",
    )
    min_eos_rate: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Check on the adapter: share of sampled validation prompts whose tuned generation reaches EOS.",
    )
    eos_check_samples: int = Field(8, ge=0, description="Validation prompts generated for the EOS check (0 = off).")
    launcher: Literal["python", "accelerate", "k8s"] = Field(
        "python",
        description="How the training child process starts: 'python' (one process), 'accelerate' (accelerate "
        "launch with training.num_processes, e.g. one per GPU) or 'k8s' (a pod through dagster-k8s, see k8s).",
    )
    k8s: K8sSpec | None = Field(None, description="The training pod, with launcher: k8s.")
    accelerate_config: str | None = Field(
        None,
        description="With launcher: accelerate, accelerate's own config file (FSDP, DeepSpeed, mixed precision), "
        "relative to the spec file; default: ACCELERATE_CONFIG_FILE or accelerate's default config, if present.",
    )


class SearchParam(_Strict):
    type: Literal["float", "int", "categorical"] = Field(description="Kind of distribution.")
    low: float | None = Field(None, description="Lower bound (float/int).")
    high: float | None = Field(None, description="Upper bound (float/int).")
    log: bool = Field(False, description="Sample on a log scale (float/int).")
    choices: list[Any] | None = Field(None, description="Values to choose from (categorical).")

    @model_validator(mode="after")
    def _shape(self) -> SearchParam:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} needs 'low' and 'high'")
            if self.low > self.high:
                raise ValueError("'low' must be <= 'high'")
            if self.log and self.low <= 0:
                raise ValueError("log scale needs 'low' > 0")
        return self


class SweepSpec(_Strict):
    enabled: bool = Field(False, description="Run an Optuna search before training the adapter.")
    n_trials: int = Field(4, gt=0, description="Trials per sweep (completed trials in storage count toward it).")
    max_steps: int = Field(10, gt=0, description="Training steps per trial.")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Wall-time budget of the whole sweep: each trial gets an equal share (times parallel_trials) as "
        "its training.max_minutes, turned into its step count by the calibration, and no new trial starts after it.",
    )
    eval_steps: int = Field(
        0,
        ge=0,
        description="Each trial reports its validation loss every N steps (the pruner decides on these); "
        "0 = twice per trial (max_steps // 2).",
    )
    parallel_trials: int = Field(
        1,
        gt=0,
        description="Trials trained at once, each in its own child process, sharing the study's storage "
        "(on one machine: mind its memory and cores).",
    )

    objective: str = Field(
        "eval_loss",
        description="What a trial is scored by: eval_loss (validation loss, minimised) or a per-row task metric from "
        "evaluation.metrics (e.g. field_accuracy; greedy answers on objective_samples validation rows, in the "
        "metric's direction).",
    )
    objective_samples: int = Field(32, gt=0, description="Validation rows generated per trial for a metric objective.")
    pruner: Literal["median", "none"] = Field("median", description="Optuna pruner for unpromising trials.")
    seed: int = Field(0, description="Sampler seed (TPE).")
    search_space: dict[str, SearchParam] = Field(
        default_factory=dict,
        description=f"Parameters to search, by name: {', '.join(sorted(SEARCHABLE_PARAMS))}.",
    )

    @field_validator("search_space")
    @classmethod
    def _known_params(cls, v: dict[str, SearchParam]) -> dict[str, SearchParam]:
        unknown = sorted(set(v) - set(SEARCHABLE_PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; searchable: {sorted(SEARCHABLE_PARAMS)}")
        return v

    @model_validator(mode="after")
    def _space_when_enabled(self) -> SweepSpec:
        if self.enabled and not self.search_space:
            raise ValueError("sweep.enabled needs a non-empty search_space")
        return self


class CustomMetric(_Strict):
    """A metric of your own, scored per row: ``function(prediction, reference) -> float``."""

    function: str = Field(
        description="'module:function' importable from the pipeline's environment, e.g. 'my_metrics:sql_match'."
    )
    higher_is_better: bool = Field(True, description="Direction of improvement.")

    @field_validator("function")
    @classmethod
    def _module_function(cls, v: str) -> str:
        mod, sep, fn = v.partition(":")
        if not sep or not mod or not fn.isidentifier():
            raise ValueError(f"'{v}' must be 'module:function' (e.g. 'my_metrics:sql_match')")
        return v


class ForgettingSpec(_Strict):
    """Catastrophic-forgetting check: perplexity of base and tuned model on general text the task never saw."""

    enabled: bool = Field(True, description="Measure perplexity on the probe set (a warning check, never blocking).")
    probe: str = Field(
        "builtin",
        description="'builtin' (general-English paragraphs shipped in the package, written for it, Apache-2.0) "
        "or a path to a .txt file with one passage per paragraph (blank-line separated).",
    )
    max_perplexity_ratio: float = Field(
        1.25, gt=0, description="Warn when tuned perplexity on the probe exceeds base perplexity by this factor."
    )


class JudgeSpec(_Strict):
    """Optional LLM-as-judge: pairwise comparison of the tuned and the base (or champion) answer, both orders."""

    enabled: bool = Field(False, description="Off by default; the verdicts appear in the report (never a gate).")
    model: str | None = Field(
        None, description="Local judge: a model folder (or a hub id already in the local cache; nothing downloads)."
    )
    endpoint_env: str = Field(
        "FINETUNE_JUDGE_URL",
        description="Environment variable holding an OpenAI-compatible base URL (used when model is not set).",
    )
    api_key_env: str = Field("FINETUNE_JUDGE_API_KEY", description="Environment variable holding the endpoint's key.")
    endpoint_model: str = Field("gpt-4o-mini", description="Model name sent to the endpoint.")
    max_rows: int = Field(20, gt=0, description="Rows judged (the first rows of the test split).")


class EvaluationSpec(_Strict):
    metrics: list[str] = Field(
        default_factory=lambda: ["exact_match", "json_valid", "rouge_l", "perplexity", "field_accuracy"],
        description="Metrics computed for base, tuned and champion on the same test rows: exact_match, token_f1, "
        "bleu, chrf (sacrebleu, sentence level, 0..1), rouge_1, rouge_2, rouge_l (rouge-score), json_valid, "
        "json_schema (needs json_schema), field_accuracy, perplexity, or a name from custom_metrics.",
    )
    primary_metric: str = Field("exact_match", description="Metric that decides the gate and promotion.")
    custom_metrics: dict[str, CustomMetric] = Field(
        default_factory=dict, description="Metrics of your own by name: {name: {function: 'module:function'}}."
    )
    json_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema the answers must follow (metric json_schema; checked with jsonschema)."
    )
    label_fields: list[str] = Field(
        default_factory=list,
        description="Categorical fields of JSON answers: per-label precision/recall/F1 and a confusion table.",
    )
    max_samples: int = Field(64, gt=0, description="Test rows generated for (perplexity uses the same rows).")
    max_new_tokens: int = Field(64, gt=0, description="Generation length limit.")
    batch_size: int = Field(16, gt=0, description="Generation batch size.")
    n_report_samples: int = Field(8, ge=0, description="Worst regressions (and samples) shown in the report.")
    bootstrap_resamples: int = Field(1000, ge=100, description="Paired bootstrap resamples per interval.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap (the same rows give the same intervals).")
    forgetting: ForgettingSpec = Field(default_factory=ForgettingSpec, description="General-text perplexity probe.")
    judge: JudgeSpec = Field(default_factory=JudgeSpec, description="Optional LLM-as-judge (off by default).")

    @model_validator(mode="after")
    def _metrics_known(self) -> EvaluationSpec:
        builtin = set(get_args(MetricName))
        clash = sorted(set(self.custom_metrics) & builtin)
        if clash:
            raise ValueError(f"custom_metrics {clash} shadow built-in metrics: rename them")
        unknown = [m for m in self.metrics if m not in builtin and m not in self.custom_metrics]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}: use {sorted(builtin)} or define them under custom_metrics")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary_metric '{self.primary_metric}' must be listed in metrics")
        if "json_schema" in self.metrics and self.json_schema is None:
            raise ValueError("metric json_schema needs evaluation.json_schema (a JSON Schema object for the answers)")
        return self


class RegistrySpec(_Strict):
    """Which results may be registered, and when the champion alias moves (decisions, not part of any cache key).

    Gates decide on the lower bound of the paired bootstrap interval at registry.confidence, never on a point
    estimate: a gain the test split cannot distinguish from noise does not pass."""

    model_name: str = Field(description="MLflow registered-model name.")
    min_improvement_over_base: float = Field(
        0.0,
        description="Blocking gate: the lower bound of tuned - base on evaluation.primary_metric (in the metric's "
        "better direction) must be at least this; otherwise the model is not registered.",
    )
    promotion_min_delta: float = Field(
        0.0,
        description="'champion' moves only if the lower bound of challenger - champion on the primary metric, "
        "both scored on the same test rows, is above this.",
    )
    confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1.0,
        description="Confidence of the paired bootstrap intervals the gates decide on (and the report shows).",
    )
    floors: dict[str, float] = Field(
        default_factory=dict,
        description="Absolute floors per metric ({json_valid: 0.95}): a version below any floor is not promoted "
        "(perplexity: a ceiling, as lower is better).",
    )


class ServingSpec(_Strict):
    """How `finetune-pipeline serve` treats the traffic it answers (decisions about serving, not part of training)."""

    log_requests: bool = Field(
        False,
        description="Append every request answered by `finetune-pipeline serve` and its answer, as JSONL in the chat "
        "format ({messages: [...]}) with personal data and secrets masked (cleaning.pii's kinds, whatever its mode), "
        "to the pipeline's review folder under the state root (pipelines/<name>/review/), outside incoming_dir. "
        "Moving a reviewed file into incoming_dir makes it an ordinary drop. Off by default.",
    )


# vLLM's --max-lora-rank accepts only these values (vllm/config/lora.py, MaxLoRARanks); an adapter serves when its
# rank is at most the flag's value, so the largest is the limit.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ReleaseFormat = Literal["safetensors_bf16", "safetensors_fp16", "gguf_f16", "gguf_q8_0"]


class ReleaseSpec(_Strict):
    """The release asset: the champion exported for deployment, every artifact loaded back and scored on the
    evaluation's test rows, and measured under a short loopback load test."""

    enabled: bool = Field(True, description="Build the release asset for the version holding 'champion'.")
    formats: list[ReleaseFormat] = Field(
        default_factory=lambda: ["safetensors_bf16", "safetensors_fp16", "gguf_f16", "gguf_q8_0"],
        description="Artifacts to export: merged weights as safetensors (bf16, fp16; QLoRA merged into the "
        "dequantised 4-bit base), GGUF f16 / q8_0 with the chat template embedded (plus an Ollama Modelfile).",
    )
    max_drop: float = Field(
        0.02,
        ge=0,
        description="Blocking check: an artifact fails the release when the lower bound of artifact - evaluated "
        "model on evaluation.primary_metric (paired bootstrap, same test rows, registry.confidence) is below "
        "-max_drop.",
    )
    targets: list[Literal["llama_cpp", "ollama", "vllm"]] = Field(
        default_factory=lambda: ["llama_cpp", "ollama"],
        description="Where the release will be served. 'vllm' makes the spec check refuse adapters vLLM cannot "
        "load (rank above 512, DoRA, LoRA bias, LoRA on lm_head / embed_tokens, modules_to_save).",
    )
    load_test_requests: int = Field(
        20, ge=0, description="Requests per concurrency level in the loopback load test of each artifact (0 = off)."
    )
    load_test_concurrency: list[int] = Field(
        default_factory=lambda: [1, 4], description="Concurrent clients of the load test, one run per value."
    )
    load_test_max_tokens: int = Field(32, gt=0, description="max_tokens of each load-test request.")
    log_artifacts: bool = Field(
        True, description="Copy the artifacts into MLflow (under the version's run, folder release/)."
    )

    @field_validator("load_test_concurrency")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError("needs at least one concurrency level, each >= 1, e.g. [1, 4]")
        return v


def vllm_problems(model: ModelSpec) -> list[str]:
    """Why vLLM cannot serve this adapter (empty: it can). Full fine-tuning has no adapter to check."""
    if model.method == "full":
        return []
    lora, out = model.lora, []
    if lora.r > VLLM_MAX_LORA_RANKS[-1]:
        out.append(f"model.lora.r {lora.r} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    on_head = sorted({t for t in targets if t.split(".")[-1] in ("lm_head", "embed_tokens", "wte")})
    if on_head:
        out.append(f"model.lora.target_modules {on_head}: vLLM loads no LoRA on the output head or embeddings")
    if lora.modules_to_save:
        out.append("model.lora.modules_to_save: vLLM only loads adapters whose modules_to_save is None")
    if lora.use_dora:
        out.append("model.lora.use_dora: vLLM does not load DoRA adapters")
    if lora.bias != "none":
        out.append("model.lora.bias: vLLM does not load LoRA biases (use bias: none)")
    return out


def vllm_max_lora_rank(r: int) -> int:
    """The smallest value vLLM's --max-lora-rank accepts that serves a rank-``r`` adapter."""
    return next(v for v in VLLM_MAX_LORA_RANKS if v >= r)


class AutomationSpec(_Strict):
    mode: Literal["sensor_schedule", "declarative"] = Field(
        "sensor_schedule",
        description="sensor_schedule: the incoming sensor requests one ingest run per drop and the retraining "
        "schedule (retrain_cron) requests training when the data changed. declarative: Dagster's declarative "
        "automation instead (AutomationConditions on the assets, evaluated by the daemon's default automation "
        "sensor): new drops are ingested eagerly, training materialises when a drop that passed its blocking checks "
        "arrived and every blocking check upstream passed, at most once per retrain_cron tick; the incoming sensor "
        "then only registers drops as partitions.",
    )
    sensor_enabled: bool = Field(True, description="Start the incoming-folder sensor by default.")
    sensor_interval_seconds: int = Field(30, gt=0, description="Seconds between sensor ticks.")
    max_runs_per_tick: int | None = Field(
        None,
        gt=0,
        description="Most ingest runs the sensor requests in one tick; the other finished files wait (oldest first) "
        "for the next ticks, so that a tick, which includes Dagster submitting its runs (~1-2 s a run on 2 cores), "
        "ends within the interval. Default: one run per 2 s of sensor_interval_seconds (15 at 30 s).",
    )
    retrain_cron: str | None = Field(
        "0 3 * * *", description="Cron for the retraining schedule (skips when the training data is unchanged)."
    )
    schedule_enabled: bool = Field(False, description="Start the retraining schedule by default.")

    @property
    def runs_per_tick(self) -> int:
        """``max_runs_per_tick``, or its default: one run per 2 s of the sensor's interval, at least one."""
        return self.max_runs_per_tick or max(1, self.sensor_interval_seconds // 2)

    @model_validator(mode="after")
    def _declarative_needs_cron(self) -> AutomationSpec:
        if self.mode == "declarative" and not self.retrain_cron:
            raise ValueError(
                "mode declarative trains at most once per retrain_cron tick: set retrain_cron (e.g. '0 3 * * *')"
            )
        return self


class PipelineSpec(_Strict):
    name: str = Field(description="Pipeline name: asset key prefix and group (letters, digits, underscores).")
    description: str = Field("", description="What this pipeline fine-tunes for.")
    source: SourceSpec | None = Field(
        None, description="Where data comes from and how it is shaped (one source; or use sources for several)."
    )
    sources: list[SourceSpec] = Field(
        default_factory=list,
        description="Several sources instead of source: each with its own name, folder, glob, formats, column map, "
        "label normalisation, and weight or max_rows in the training mix.",
    )
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="Row validation and cleaning rules.")
    dedup: DedupSpec = Field(default_factory=DedupSpec, description="Exact and near-duplicate removal.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Train/validation/test split.")
    drift: DriftSpec = Field(default_factory=DriftSpec, description="Drift of new drops against the training split.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Base model and fine-tuning method.")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="What is learned: trainer settings (trl SFTConfig)."
    )
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec,
        description="How training runs are launched and observed (logging, checkpoints, calibration, EOS check).",
    )
    sweep: SweepSpec = Field(default_factory=SweepSpec, description="Optuna hyperparameter search.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation on the test split.")
    registry: RegistrySpec = Field(description="MLflow model registry and promotion rule.")
    automation: AutomationSpec = Field(default_factory=AutomationSpec, description="Sensor and schedule.")
    serving: ServingSpec = Field(
        default_factory=ServingSpec, description="`finetune-pipeline serve`: the optional feedback drop."
    )
    release: ReleaseSpec = Field(
        default_factory=ReleaseSpec, description="Exported artifacts of the champion, each scored before release."
    )

    @model_validator(mode="after")
    def _sweep_needs_validation(self) -> PipelineSpec:
        if (self.source is None) == (not self.sources):
            raise ValueError(NO_SOURCE)
        names = [s.name for s in self.source_list()]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must be unique (got {names}); give each source its own name")
        if self.sweep.enabled and self.split.validation_fraction == 0:
            raise ValueError("sweep.enabled scores trials on the validation split: set split.validation_fraction > 0")
        for src in self.source_list():
            where = "source" if self.source is not None else f"sources[{src.name}]"
            if self.split.method == "stratified" and not src.columns.label:
                raise ValueError(f"split.method stratified needs {where}.columns.label (the label column)")
            if self.split.method == "temporal" and not src.columns.timestamp:
                raise ValueError(f"split.method temporal needs {where}.columns.timestamp (the timestamp column)")
        c = self.cleaning
        if c.min_tokens is not None and c.max_tokens is not None and c.min_tokens > c.max_tokens:
            raise ValueError("cleaning.min_tokens must be <= cleaning.max_tokens")
        if (self.training.max_minutes or self.sweep.max_minutes) and not self.runtime.calibration_steps:
            raise ValueError("training.max_minutes / sweep.max_minutes need runtime.calibration_steps > 0")
        if self.training.num_processes > 1 and self.runtime.launcher == "python":
            raise ValueError("training.num_processes > 1 needs runtime.launcher: accelerate (or k8s)")
        if self.runtime.launcher == "k8s" and self.runtime.k8s is None:
            raise ValueError("runtime.launcher: k8s needs runtime.k8s (image, state_pvc)")
        obj = self.sweep.objective
        if obj != "eval_loss" and (obj not in self.evaluation.metrics or obj == "perplexity"):
            raise ValueError(
                f"sweep.objective '{obj}' must be eval_loss or a per-row metric listed in evaluation.metrics "
                f"({', '.join(m for m in self.evaluation.metrics if m != 'perplexity')})"
            )
        unknown_floors = sorted(set(self.registry.floors) - set(self.evaluation.metrics))
        if unknown_floors:
            raise ValueError(f"registry.floors {unknown_floors} are not in evaluation.metrics: add them there")
        if "vllm" in self.release.targets and (why := vllm_problems(self.model)):
            raise ValueError(
                "release.targets includes vllm, which cannot serve this adapter: "
                + "; ".join(why)
                + ". Change the adapter settings, or drop vllm from release.targets (the merged safetensors of the "
                "release still serve with vLLM)"
            )
        return self

    def source_list(self) -> list[SourceSpec]:
        """Every source of the pipeline (``source`` alone, or the ``sources`` list)."""
        return [self.source] if self.source is not None else list(self.sources)

    def source_named(self, name: str | None) -> SourceSpec:
        """The source of this name; the first source for None or a name no longer in the spec (older drops)."""
        found = [s for s in self.source_list() if s.name == name]
        return found[0] if found else self.source_list()[0]

    def with_overrides(self, params: dict[str, Any]) -> PipelineSpec:
        """The spec with sweep parameters applied (``{"learning_rate": 3e-4, "lora.r": 8}``), validated again:
        every consumer then reads plain ``training`` / ``model.lora`` values, never a side dict."""
        unknown = sorted(set(params) - set(SEARCHABLE_PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; searchable: {sorted(SEARCHABLE_PARAMS)}")
        data = self.model_dump(mode="json")
        for name, value in params.items():
            *parents, leaf = SEARCHABLE_PARAMS[name]
            node = data
            for part in parents:
                node = node[part]
            node[leaf] = value
        return PipelineSpec.model_validate(data)

    def searchable_values(self) -> dict[str, Any]:
        """Current value of every searchable parameter, by its search-space name (what a run is logged with)."""
        out = {}
        for name, path in SEARCHABLE_PARAMS.items():
            node: Any = self
            for part in path:
                node = getattr(node, part)
            out[name] = node
        return out

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", v):
            raise ValueError("must start with a letter and contain only letters, digits and underscores")
        return v


class LoadedSpec(BaseModel):
    """A validated spec plus where it came from (for resolving relative paths and hashing)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    spec: PipelineSpec
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def resolve(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else (self.base_dir / q).resolve()

    @property
    def incoming_dir(self) -> Path:
        """The first source's folder (the only one for a single ``source``)."""
        return self.resolve(self.spec.source_list()[0].incoming_dir)

    def incoming_of(self, source: SourceSpec) -> Path:
        return self.resolve(source.incoming_dir)

    @property
    def spec_hash(self) -> str:
        return spec_hash(self.spec)

    # The sections, read through the loaded spec: `loaded.training` for `loaded.spec.training`.
    def source_list(self) -> list[SourceSpec]:
        return self.spec.source_list()

    @property
    def description(self) -> str:
        return self.spec.description

    @property
    def cleaning(self) -> CleaningSpec:
        return self.spec.cleaning

    @property
    def dedup(self) -> DedupSpec:
        return self.spec.dedup

    @property
    def split(self) -> SplitSpec:
        return self.spec.split

    @property
    def drift(self) -> DriftSpec:
        return self.spec.drift

    @property
    def model(self) -> ModelSpec:
        return self.spec.model

    @property
    def training(self) -> TrainingSpec:
        return self.spec.training

    @property
    def runtime(self) -> RuntimeSpec:
        return self.spec.runtime

    @property
    def sweep(self) -> SweepSpec:
        return self.spec.sweep

    @property
    def evaluation(self) -> EvaluationSpec:
        return self.spec.evaluation

    @property
    def registry(self) -> RegistrySpec:
        return self.spec.registry

    @property
    def automation(self) -> AutomationSpec:
        return self.spec.automation


class SpecError(ValueError):
    """All problems found in one spec file, each with its field path and line."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the pipeline spec:\n{lines}")


def spec_hash(spec: PipelineSpec) -> str:
    """Stable short hash of the spec's content (all fields, defaults included), except ``serving`` and ``release``:
    how the registered model is served and exported changes no dataset, training or evaluation (and adding those
    sections kept every existing spec's hash; the release asset keys on its own section), and
    ``automation.max_runs_per_tick`` (how fast new drops are requested changes none of them)."""
    exclude = {"serving": True, "release": True, "automation": {"max_runs_per_tick"}}
    return short_hash(spec.model_dump(mode="json", exclude=exclude))


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at ``path`` (or of its deepest existing parent)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in path:
        if isinstance(node, yaml.MappingNode):
            # the last occurrence of a key: the one YAML keeps when a key is given twice
            nxt = next((v for k, v in reversed(node.value) if k.value == str(part)), None)
            if nxt is None:
                key_node = next((k for k, _ in reversed(node.value) if k.value == str(part)), None)
                return key_node.start_mark.line + 1 if key_node is not None else line
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return line
        line = node.start_mark.line + 1
    return line


def _friendly(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    ctx = err.get("ctx") or {}
    if err["type"] == "greater_than":
        return f"must be > {ctx.get('gt')}"
    if err["type"] == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}"
    if err["type"] == "less_than":
        return f"must be < {ctx.get('lt')}"
    if err["type"] == "less_than_equal":
        return f"must be <= {ctx.get('le')}"
    if err["type"] == "extra_forbidden":
        loc = tuple(str(p) for p in err["loc"])
        if loc[-2:] in MOVED_FIELDS:
            return f"moved: this setting is now {MOVED_FIELDS[loc[-2:]]} (move it there)"
        return "unknown field (check the spelling; see spec.schema.json for the fields)"
    if err["type"] == "missing":
        return "required field is missing"
    return msg.removeprefix("Value error, ")


def _yaml_problem(exc: yaml.YAMLError, text: str, source: str) -> str:
    """A YAML syntax error at its cause: an unclosed quote or bracket is reported where it opens (PyYAML's
    context mark), other errors where they were found, with both places and the offending line's text."""
    context, problem = getattr(exc, "context", None), getattr(exc, "problem", None)
    cmark, pmark = getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)
    use_context = cmark is not None and context and "block" not in context
    mark = cmark if use_context else pmark
    if mark is None:
        return f"{source}: not valid YAML: {exc}"
    lines = text.splitlines()
    snippet = lines[mark.line].strip() if mark.line < len(lines) else ""
    parts = []
    if context and cmark is not None:
        parts.append(f"{context} (line {cmark.line + 1}, column {cmark.column + 1})")
    if problem and pmark is not None:
        parts.append(f"{problem} (line {pmark.line + 1}, column {pmark.column + 1})")
    detail = ": ".join(parts) or str(exc)
    return f"{source}:{mark.line + 1}: not valid YAML: {detail}" + (f"; the line reads: {snippet}" if snippet else "")


def _duplicate_keys(node: yaml.Node | None, source: str, path: tuple[str, ...] = ()) -> list[str]:
    """Keys given twice in one mapping (YAML keeps only the last, silently): one problem each, with both lines."""
    out: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            name = str(k.value)
            dotted = ".".join((*path, name))
            if name in first:
                out.append(
                    f"{source}:{k.start_mark.line + 1}: {dotted}: duplicate key (also at line {first[name]}); only the "
                    "last one would count: merge the two into one"
                )
            else:
                first[name] = k.start_mark.line + 1
            out.extend(_duplicate_keys(v, source, (*path, name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out.extend(_duplicate_keys(v, source, (*path, str(i))))
    return out


def parse_spec(text: str, source: str = "<spec>", path: Path | None = None) -> LoadedSpec:
    """Validate YAML text; raise SpecError listing every problem with its path and line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(source, [_yaml_problem(exc, text, source)]) from exc
    if not isinstance(data, dict):
        raise SpecError(source, [f"{source}: the spec must be a YAML mapping with at least name, source and registry"])
    spec = validate_spec_data(data, source, lambda loc: _line_of(node, loc), _duplicate_keys(node, source))
    return LoadedSpec(spec=spec, path=path.resolve() if path else None)


def validate_spec_data(
    data: dict[str, Any],
    source: str,
    line_of: Callable[[tuple[Any, ...]], int | None],
    problems: list[str] | None = None,
) -> PipelineSpec:
    """Validate a spec mapping already parsed from YAML; raise SpecError with every problem as
    ``source:line: field.path: message``. ``line_of(loc)`` gives the line of a field path (a spec file, or the
    ``attributes`` of a Dagster component's defs.yaml: both routes report the same problems)."""
    problems = list(problems or [])
    no_source = "source" not in data and "sources" not in data
    if no_source:
        problems.append(
            f"{source}: source: required field is missing (one source; or sources: a list of named sources)"
        )
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            if no_source and NO_SOURCE in str(err["msg"]):
                continue
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            dotted = ".".join(str(p) for p in loc) or "<root>"
            line = line_of(loc)
            where = f"{source}:{line}" if line else source
            problems.append(f"{where}: {dotted}: {_friendly(err)}")
        raise SpecError(source, problems) from None
    if problems:
        raise SpecError(source, problems)
    return spec


def load_spec(path: str | Path) -> LoadedSpec:
    """Load and validate one spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(str(p), [f"{p}: cannot read the spec file: {exc.strerror}"]) from exc
    return parse_spec(text, source=str(p), path=p)


def load_specs_report(folder: str | Path) -> tuple[list[LoadedSpec], dict[Path, list[str]]]:
    """Load every ``*.yaml`` spec in a folder without letting one broken file stop the others: returns the
    good specs and, per broken file, its problems. A second spec using a name already taken is broken."""
    folder = Path(folder)
    specs: list[LoadedSpec] = []
    broken: dict[Path, list[str]] = {}
    for p in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            s = load_spec(p)
        except SpecError as exc:
            broken[p] = list(exc.problems)
            continue
        taken = next((o for o in specs if o.name == s.name), None)
        if taken is not None:
            broken[p] = [
                f"{p}: two specs use the name '{s.name}' (also {taken.path.name if taken.path else '?'}); "
                "pipeline names must be unique"
            ]
            continue
        specs.append(s)
    return specs, broken


def load_specs(folder: str | Path) -> list[LoadedSpec]:
    """Load every ``*.yaml`` spec in a folder; all files are checked before any error is raised (strict: for
    callers that must not run with a broken spec; definitions.py uses load_specs_report)."""
    specs, broken = load_specs_report(folder)
    if broken:
        raise SpecError(str(folder), [p for problems in broken.values() for p in problems])
    return specs


def json_schema() -> dict[str, Any]:
    """JSON schema of the spec, for editors (yaml-language-server) and docs."""
    return PipelineSpec.model_json_schema()


def main() -> None:  # pragma: no cover - thin CLI
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m finetune_pipeline.spec")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("schema", help="print the JSON schema")
    chk = sub.add_parser("check", help="validate spec files")
    chk.add_argument("paths", nargs="+")
    args = ap.parse_args()
    if args.cmd == "schema":
        print(json.dumps(json_schema(), indent=2))
        return
    failed = False
    for p in args.paths:
        try:
            s = load_spec(p)
            print(f"{p}: ok ({s.name}, spec hash {s.spec_hash})")
        except SpecError as exc:
            failed = True
            print(exc, file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
