"""The state layout and the typed records stored in it: the one owner of every path under the state root.

Shells, automation, the CLI and tests all ask a ``StateLayout`` / ``PipelineLayout`` where a thing lives; no other
module writes a file name under the state root. Every record persisted there is a pydantic model with ``save`` and
``load``, never read back as a dict. No dagster import here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

SPLITS = ("train", "validation", "test")
R = TypeVar("R", bound="Record")


class Record(BaseModel):
    """A JSON record on disk: written atomically, read back typed."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")  # NaN (no value) round-trips

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls: type[R], path: Path) -> R:
        return cls.model_validate_json(path.read_text())


class RawDropRecord(Record):
    """raw_dataset: one dropped file, copied byte for byte."""

    drop: str
    source_file: str = Field(description="The file the user dropped (named in every message about it).")
    source: str = Field("default", description="Name of the spec source (source.name / sources[].name) it came from.")
    stored_at: str
    bytes: int
    lines: int
    sha256: str


class SplitsManifest(Record):
    """dataset_splits: which drops the splits hold and the digest of each split."""

    drops: list[str]
    digests: dict[str, str]
    version: str
    counts: dict[str, int]
    spec_hash: str


class BaseModelRecord(Record):
    """base_model: where the base weights are and what they hash to."""

    path: str = Field(description="Local safetensors folder, or a hub id when the base is not local.")
    kind: str = Field(description="packaged | local | hub")
    digest: str
    source: str = Field(description="What the spec's model.base named.")
    tokenizer_dir: str = Field(description="Local folder with tokenizer.json and the chat template (token counts).")


class SweepRecord(Record):
    """hyperparameter_sweep: the finished study and its best parameters."""

    study: str
    best_params: dict[str, Any]
    best_value: float
    mlflow_run_id: str
    data_version: str
    trials_complete: int = 0
    trials_pruned: int = 0
    trials: list[dict[str, Any]] = Field(default_factory=list)


class AdapterRecord(Record):
    """adapter: what was trained, from what, and what it cost (the cost as the training child reported it)."""

    adapter_key: str
    path: str
    train_run_id: str
    sweep_run_id: str = ""
    spec_hash: str
    code_version: str
    base_weights_digest: str
    splits_version: str
    split_digests: dict[str, str]
    drops: list[str]
    params: dict[str, Any] = Field(description="The searchable parameters the adapter was trained with.")
    cost: dict[str, Any] = Field(default_factory=dict, description="Cost metadata reported by the training child.")
    reproducibility: dict[str, Any] = Field(default_factory=dict, description="Seeds, library versions, hardware.")

    def reproducibility_record(self) -> dict[str, Any]:
        """Everything needed to reproduce the adapter: data, base weights, code, spec, seeds, versions, hardware."""
        ids = self.model_dump(
            include={"spec_hash", "code_version", "base_weights_digest", "splits_version", "adapter_key"}
        )
        return {**ids, "data_digests": self.split_digests, **self.reproducibility}


class Registration(Record):
    """registered_model: the MLflow model version, its aliases and why champion moved (or did not)."""

    name: str
    version: str
    model_uri: str
    aliases: list[str]
    promoted: bool
    champion_version: str | None
    previous_champion: str | None
    previous_champion_score: float | None
    reason: str
    reload_max_logit_diff: float
    adapter_key: str
    register_run_id: str = ""
    tuned_score: float | None = None
    primary_metric: str = ""
    evidence: dict[str, str] = Field(default_factory=dict)  # the decision and its numbers, as on the version
    model_card: str = ""  # the version's description in the registry (markdown)


class StateLayout:
    """Everything the pipelines produce lives under one root (FINETUNE_HOME)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def models(self) -> Path:
        """Provisioned base models (safetensors folders) and saved hub tokenizers."""
        return self.root / "models"

    @property
    def tokenizers(self) -> Path:
        """Tokenizers of hub models, saved once (token counts need a local tokenizer.json)."""
        return self.models / "tokenizers"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow" / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlflow" / "artifacts"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna" / "optuna.db"

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    def pipeline(self, name: str) -> PipelineLayout:
        return PipelineLayout(self.root, name)


class PipelineLayout:
    """Where one pipeline's datasets, sweep, adapters, evaluations and registration live."""

    def __init__(self, root: Path, name: str):
        self.state = StateLayout(root)
        self.name = name
        self.dir = Path(root) / "pipelines" / name

    # per drop
    def raw(self, drop: str) -> Path:
        """The stored copy of a dropped file (it keeps the dropped file's extension, which tells the format)."""
        rec = self.raw_record(drop)
        if rec.exists():
            return Path(RawDropRecord.load(rec).stored_at)
        return self.raw_for(drop, ".jsonl")

    def raw_for(self, drop: str, suffix: str) -> Path:
        return self.dir / "raw" / f"{drop}{suffix}"

    def raw_record(self, drop: str) -> Path:
        return self.dir / "raw" / f"{drop}.record.json"

    def kept(self, drop: str) -> Path:
        """A drop's cleaned rows; present only when the drop passed its gates (what training uses)."""
        return self.dir / "cleaned" / f"{drop}.parquet"

    def quarantine(self, drop: str) -> Path:
        return self.dir / "quarantine" / f"{drop}.parquet"

    def duplicates(self, drop: str) -> Path:
        return self.dir / "duplicates" / f"{drop}.parquet"

    @property
    def review(self) -> Path:
        """Served requests and answers waiting for review (serving.log_requests), outside every incoming_dir."""
        return self.dir / "review"

    def pii(self, drop: str) -> Path:
        """A drop's rows in which cleaning.pii found personal data or secrets (masked previews)."""
        return self.dir / "pii" / f"{drop}.parquet"

    def drift(self, drop: str) -> Path:
        return self.dir / "drift" / f"{drop}.json"

    # over all drops
    @property
    def splits(self) -> Path:
        return self.dir / "splits"

    def split(self, name: str) -> Path:
        return self.splits / f"{name}.parquet"

    @property
    def splits_manifest(self) -> Path:
        return self.splits / "manifest.json"

    @property
    def cross_drop_duplicates(self) -> Path:
        return self.splits / "cross_drop_duplicates.parquet"

    @property
    def test_train_leaks(self) -> Path:
        return self.splits / "test_train_leaks.parquet"

    @property
    def readiness(self) -> Path:
        return self.splits / "readiness.json"

    @property
    def conflicts(self) -> Path:
        return self.splits / "conflicts.parquet"

    @property
    def conflict_quarantine(self) -> Path:
        return self.splits / "conflict_quarantine.parquet"

    @property
    def token_stats(self) -> Path:
        return self.splits / "token_stats.json"

    # model side
    @property
    def base_model(self) -> Path:
        return self.dir / "base_model.json"

    @property
    def sweep(self) -> Path:
        return self.dir / "sweep"

    @property
    def sweep_record(self) -> Path:
        return self.sweep / "best.json"

    @property
    def adapters(self) -> Path:
        return self.dir / "adapters"

    def adapter(self, key: str) -> Path:
        return self.adapters / key

    def adapter_work(self, key: str) -> Path:
        """Where an adapter trains (checkpoints, request); renamed to ``adapter(key)`` once finished."""
        return self.adapters / f"{key}.partial"

    def train_request(self, key: str) -> Path:
        """The training child's request (its pid file is written next to it)."""
        return self.adapter_work(key) / "request.json"

    def checkpoints(self, key: str) -> Path:
        return self.adapter_work(key) / "checkpoints"

    def adapter_record(self, key: str) -> Path:
        return self.adapter(key) / "adapter.json"

    def eval(self, key: str) -> Path:
        return self.dir / "eval" / key

    def eval_record(self, key: str) -> Path:
        return self.eval(key) / "eval.json"

    def eval_markdown(self, key: str) -> Path:
        return self.eval(key) / "report.md"

    def base_outputs(self, key: str) -> Path:
        return self.dir / "eval" / "base_outputs" / f"{key}.json"

    def champion_outputs(self, version: str, key: str) -> Path:
        """A champion version's outputs on one test split (keys.champion_outputs_key)."""
        return self.dir / "eval" / "champion_outputs" / f"v{version}-{key}.json"

    @property
    def registration(self) -> Path:
        return self.dir / "registered_model.json"

    def release(self, version: str, key: str) -> Path:
        """The exported artifacts of one registered version (stages.release), by release key."""
        return self.dir / "release" / f"v{version}-{key}"

    def release_record(self, version: str, key: str) -> Path:
        return self.release(version, key) / "release.json"

    # readers that name the asset to materialize when a record is missing
    def read_manifest(self) -> SplitsManifest:
        if not self.splits_manifest.exists():
            raise FileNotFoundError(f"no dataset splits at {self.splits}: materialize {self.name}/dataset_splits first")
        return SplitsManifest.load(self.splits_manifest)

    def read_base(self) -> BaseModelRecord:
        if not self.base_model.exists():
            raise FileNotFoundError(
                f"no base model record at {self.base_model}: materialize {self.name}/base_model first"
            )
        return BaseModelRecord.load(self.base_model)

    def read_split_frames(self, columns: list[str] | None = None) -> dict[str, Any]:
        import pandas as pd

        self.read_manifest()
        return {s: pd.read_parquet(self.split(s), columns=columns) for s in SPLITS}

    def usable_drops(self, registered: list[str]) -> list[str]:
        """Registered drops (in arrival order) whose cleaned rows passed their gates: what training uses."""
        return [d for d in registered if self.kept(d).exists()]
