"""release: the version holding ``champion`` exported (merged safetensors bf16/fp16, GGUF f16/q8_0, Ollama
Modelfile), every artifact loaded back and scored on the test rows the version was evaluated on (paired with the
evaluated model's per-row scores), served on loopback under a short load test; the numbers go on the model card,
the version's tags and the Dagster metadata. Reused while the champion, its evaluation and the release settings
are unchanged."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field

from finetune_pipeline.hashing import short_hash
from finetune_pipeline.layout import AdapterRecord, PipelineLayout, Record
from finetune_pipeline.progress import LogFn
from finetune_pipeline.release.export import Export
from finetune_pipeline.release.loadtest import ServingNumbers
from finetune_pipeline.release.score import ArtifactScore
from finetune_pipeline.spec import LoadedSpec, vllm_max_lora_rank
from finetune_pipeline.tracking.tracker import Tracker

CARD_HEADING = "## Release artifacts"
GGUF_LOADER_NOTE = (
    "GGUF files were scored through transformers' GGUF loader, which dequantises them to float32: it checks the "
    "written tensors, their layout and the tokenizer metadata, not llama.cpp's kernels or its own tokenizer."
)


class ReleaseRecord(Record):
    """What one release exported, how each artifact scored against the evaluated model, how it served."""

    model_config = ConfigDict(ser_json_inf_nan="constants")
    release_key: str
    name: str
    version: str
    adapter_key: str
    eval_key: str
    primary_metric: str
    max_drop: float
    evaluated: dict[str, float]
    export: Export
    scores: list[ArtifactScore]
    serving: list[ServingNumbers] = Field(default_factory=list)
    card: str = ""
    vllm_commands: list[str] = Field(default_factory=list)

    def failures(self) -> list[str]:
        """Artifacts whose primary-metric lower bound fell below -max_drop, with their intervals."""
        out = []
        for s in self.scores:
            if not s.passes(self.primary_metric, self.max_drop):
                out.append(f"{s.format}: {s.vs_evaluated[self.primary_metric].describe()}")
        return out


def release_key(version: str, adapter_key: str, eval_key: str, spec: LoadedSpec) -> str:
    s = spec.spec
    return short_hash(version, adapter_key, eval_key, s.release, s.evaluation, s.registry.confidence)


def champion_of(tracker: Tracker, name: str) -> tuple[str, dict[str, str]]:
    """(version, tags) of the version holding ``champion``, read through the pipeline's Tracker."""
    mv = tracker.client.get_model_version_by_alias(name, "champion")
    return str(mv.version), dict(mv.tags)


def publish(tracker: Tracker, name: str, version: str, folder: Path | None, card: str, tags: dict[str, str]) -> str:
    """All MLflow writes of the release: the artifacts under the version (its LoggedModel's artifacts, or an older
    version's source run; folder ``release/``), the numbers as version tags, the card section in the version's
    description (replacing an earlier release section). Returns where the artifacts went ("" when not logged)."""
    where = tracker.log_version_artifacts(name, version, folder, "release") if folder is not None else ""
    for k, v in tags.items():
        tracker.client.set_model_version_tag(name, version, k, v)
    mv = tracker.client.get_model_version(name, version)
    kept = (mv.description or "").split(CARD_HEADING)[0].rstrip()
    tracker.client.update_model_version(name, version, description=f"{kept}\n\n{card}" if kept else card)
    return where


def _f(v: float | None, nd: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def card_section(rec: ReleaseRecord) -> str:
    pm = rec.primary_metric
    serving = {s.format: s for s in rec.serving}
    levels = sorted({r.concurrency for s in rec.serving for r in s.runs})
    head = "| format | size MB | loader | " + f"{pm} | artifact - evaluated [interval] |"
    head += "".join(f" c{c} p50 / p95 s | c{c} tok/s |" for c in levels) + " peak MB |"
    lines = [
        CARD_HEADING,
        "",
        f"Champion v{rec.version}, evaluated {pm} {_f(rec.evaluated.get(pm))} on the same {len(rec.scores[0].scores.predictions) if rec.scores else 0} "
        f"test rows (eval {rec.eval_key}). A release fails when an artifact's lower bound is below -{rec.max_drop} "
        "(release.max_drop).",
        "",
        head,
        "|---" * (5 + 2 * len(levels) + 1) + "|",
    ]
    sizes = {a.format: a.bytes for a in rec.export.artifacts}
    for s in rec.scores:
        iv = s.vs_evaluated[pm]
        row = f"| {s.format} | {sizes.get(s.format, 0) / 1e6:.1f} | {s.loader} | {_f(s.summary.get(pm))} | "
        row += f"{iv.delta:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] |"
        runs = {r.concurrency: r for r in serving[s.format].runs} if s.format in serving else {}
        for c in levels:
            r = runs.get(c)
            row += f" {_f(r.p50_s, 2)} / {_f(r.p95_s, 2)} | {_f(r.tokens_per_s, 1)} |" if r else " n/a | n/a |"
        row += f" {_f(serving[s.format].peak_rss_mb, 0)} |" if s.format in serving else " n/a |"
        lines.append(row)
    if rec.export.merge_max_logit_diff is not None:
        lines += [
            "",
            f"Merged float32 weights vs the adapter as evaluated: max |logit diff| {rec.export.merge_max_logit_diff:.2e}.",
        ]
    if any(s.format.startswith("gguf") for s in rec.scores):
        lines += ["", GGUF_LOADER_NOTE]
    if rec.serving:
        lines += [
            "",
            f"Serving: {rec.serving[0].server}, on 127.0.0.1, this machine's CPU; peak MB is the server process's peak resident memory.",
        ]
    return "\n".join(lines) + "\n"


def version_tags(rec: ReleaseRecord) -> dict[str, str]:
    pm = rec.primary_metric
    tags = {"finetune.release.key": rec.release_key, "finetune.release.passed": str(not rec.failures()).lower()}
    for s in rec.scores:
        iv = s.vs_evaluated[pm]
        tags[f"finetune.release.{s.format}.{pm}"] = _f(s.summary.get(pm), 6)
        tags[f"finetune.release.{s.format}.vs_evaluated"] = (
            f"{iv.delta:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}] @{iv.confidence:g}"
        )
        tags[f"finetune.release.{s.format}.loader"] = s.loader
    for sv in rec.serving:
        for r in sv.runs:
            tags[f"finetune.release.{sv.format}.c{r.concurrency}"] = (
                f"p50 {_f(r.p50_s, 3)} s, p95 {_f(r.p95_s, 3)} s, {_f(r.tokens_per_s, 1)} tok/s"
            )
        tags[f"finetune.release.{sv.format}.peak_rss_mb"] = _f(sv.peak_rss_mb, 0)
    return tags


def vllm_commands(spec: LoadedSpec, name: str, folder: Path, adapter_path: str, base_path: str) -> list[str]:
    """``vllm serve`` for the merged bf16 weights and, for an adapter, multi-LoRA on the base."""
    out = [f"vllm serve {folder / 'safetensors-bf16'} --served-model-name {name} --host 127.0.0.1 --dtype bfloat16"]
    m = spec.model
    if m.method != "full":
        out.append(
            f"vllm serve {base_path} --host 127.0.0.1 --enable-lora --lora-modules {name}={adapter_path} "
            f"--max-lora-rank {vllm_max_lora_rank(m.lora.r)}"
            + (
                "  # QLoRA: vLLM applies the adapter to the unquantised base; the merged weights are what was scored"
                if m.method == "qlora"
                else ""
            )
        )
    return out


def build_release(
    layout: PipelineLayout, spec: LoadedSpec, tracker: Tracker, log: LogFn = print
) -> tuple[ReleaseRecord, bool]:
    """Export, score and measure the champion; returns (record, reused)."""
    from finetune_pipeline.evaluation.report import EvalRecord
    from finetune_pipeline.release.export import export_all
    from finetune_pipeline.release.loadtest import measure_artifact
    from finetune_pipeline.release.score import score_artifact
    from finetune_pipeline.stages.register import load_evidence

    s, r = spec.spec, spec.spec.release
    name = s.registry.model_name
    version, tags = champion_of(tracker, name)
    akey, ekey = tags.get("finetune.adapter_key", ""), tags.get("finetune.eval.eval_key", "")
    if not layout.adapter_record(akey).exists() or not layout.eval_record(ekey).exists():
        raise FileNotFoundError(
            f"{name} v{version} (champion): its adapter {akey or '?'} or evaluation {ekey or '?'} is not under "
            f"{layout.dir}: materialize {spec.name}/eval_report and registered_model on this machine first"
        )
    key = release_key(version, akey, ekey, spec)
    if layout.release_record(version, key).exists():
        log(f"{name} v{version}: release {key} already built, reused")
        return ReleaseRecord.load(layout.release_record(version, key)), True
    ev: EvalRecord = load_evidence(layout, spec, ekey)
    if layout.read_manifest().digests["test"] != ev.test_digest:
        raise ValueError(
            f"the test split changed since {name} v{version} was evaluated: materialize eval_report and "
            "registered_model again so that the release is scored on the rows the version was scored on"
        )
    adapter = AdapterRecord.load(layout.adapter_record(akey))
    base = layout.read_base().path
    out = layout.release(version, key)
    title = f"{name} v{version}"
    exported = export_all(base, s.model, adapter.path, out, list(r.formats), title, s.evaluation.max_new_tokens, log)
    test = list(layout.read_split_frames()["test"]["messages"])
    conf = s.registry.confidence
    scores = [
        score_artifact(a.format, Path(a.path), test, ev.scores["tuned"], s.evaluation, conf, log)
        for a in exported.artifacts
    ]
    for sc in scores:
        log(
            f"{sc.format}: {ev.report.primary_metric} vs evaluated {sc.vs_evaluated[ev.report.primary_metric].describe()}"
        )
    serving: list[ServingNumbers] = []
    if r.load_test_requests > 0:
        import json

        prompts = [json.loads(m)[:-1] for m in test[: s.evaluation.max_samples]]
        for a in exported.artifacts:
            log(f"{a.format}: load test, {r.load_test_requests} requests at concurrency {r.load_test_concurrency}")
            serving.append(
                measure_artifact(
                    a.format,
                    Path(a.path),
                    prompts,
                    r.load_test_requests,
                    list(r.load_test_concurrency),
                    r.load_test_max_tokens,
                )
            )
    rec = ReleaseRecord(
        release_key=key,
        name=name,
        version=version,
        adapter_key=akey,
        eval_key=ekey,
        primary_metric=ev.report.primary_metric,
        max_drop=r.max_drop,
        evaluated=ev.report.tuned,
        export=exported,
        scores=scores,
        serving=serving,
        vllm_commands=vllm_commands(spec, name, out, adapter.path, base) if "vllm" in r.targets else [],
    )
    rec = rec.model_copy(update={"card": card_section(rec)})
    publish(tracker, name, version, out if r.log_artifacts else None, rec.card, version_tags(rec))
    rec.save(layout.release_record(version, key))
    return rec, False


def metadata_rows(rec: ReleaseRecord) -> list[dict[str, Any]]:
    """One row per artifact: what the Dagster table shows."""
    pm, serving = rec.primary_metric, {s.format: s for s in rec.serving}
    sizes = {a.format: a.bytes for a in rec.export.artifacts}
    rows = []
    for s in rec.scores:
        iv = s.vs_evaluated[pm]
        row: dict[str, Any] = {
            "format": s.format,
            "size_mb": round(sizes.get(s.format, 0) / 1e6, 1),
            pm: s.summary.get(pm),
            "vs_evaluated": f"{iv.delta:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]",
            "passed": s.passes(pm, rec.max_drop),
        }
        if s.format in serving:
            for run in serving[s.format].runs:
                row[f"c{run.concurrency}_p50_s"] = round(run.p50_s, 3)
                row[f"c{run.concurrency}_p95_s"] = round(run.p95_s, 3)
                row[f"c{run.concurrency}_tok_s"] = round(run.tokens_per_s, 1)
            row["peak_rss_mb"] = round(serving[s.format].peak_rss_mb)
            row["largest_batch"] = serving[s.format].largest_batch
        rows.append(row)
    return rows
