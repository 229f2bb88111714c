"""What the tracking layer records with: where (``TrackingTarget``), who produced a run (``Lineage``) and the tag
names the registry and the lineage command share.

A leaf: it imports no other layer of the package. The MLflow calls themselves go through a ``Tracker``
(tracking/tracker.py), which holds its own ``MlflowClient`` for the target: nothing in the package reads or sets
MLflow's process-wide tracking URI.
"""

from __future__ import annotations

from dataclasses import dataclass

TAG_PREFIX = "finetune."
HISTORY_TAG = "finetune.champion_history"  # registered-model tag: JSON list of champion moves
RELOAD_TAG = "finetune.reload_max_logit_diff"  # version tag: the round-trip check's result
ADAPTER_TAG = "finetune.adapter_key"  # version tag: the adapter a version was made from (one version per adapter)
LINEAGE_RUNS = ("register_run_id", "eval_run_id", "train_run_id", "sweep_run_id")  # version tags naming runs


@dataclass(frozen=True)
class Lineage:
    """Who produced a run: attached to every MLflow run as tags."""

    pipeline: str
    asset: str
    dagster_run_id: str
    partition: str | None
    code_version: str
    spec_hash: str

    def tags(self) -> dict[str, str]:
        t = {
            "dagster.run_id": self.dagster_run_id,
            "dagster.asset_key": self.asset,
            "dagster.partition": self.partition or "",
            "dagster.code_version": self.code_version,
            f"{TAG_PREFIX}pipeline": self.pipeline,
            f"{TAG_PREFIX}spec_hash": self.spec_hash,
        }
        return t


@dataclass(frozen=True)
class TrackingTarget:
    """Where runs and models are recorded, and the UI that shows them (from the Dagster resource)."""

    tracking_uri: str
    artifact_root: str | None  # a local folder or a URI (s3://..., file://...)
    ui_url: str = "http://127.0.0.1:5000"
    registry_uri: str = ""  # empty = the tracking URI

    @property
    def registry(self) -> str:
        return self.registry_uri or self.tracking_uri

    def run_url(self, experiment: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
