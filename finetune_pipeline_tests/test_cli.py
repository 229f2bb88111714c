"""Tier 3: the real CLI (`finetune-pipeline`, `dg launch --assets/--job`, and `dagster job execute`, which this
project's users still run) on a small spec,
with real SQLite-backed Dagster, MLflow and Optuna under a temporary state root. Asserts behaviour, not exit codes."""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from examples.demo_tickets import write_demo_drops
from finetune_pipeline_tests.conftest import REPO

pytestmark = pytest.mark.e2e

SPEC = """
name: mini
source: {{incoming_dir: {incoming}, settle_seconds: 0}}
cleaning: {{max_rejection_rate: 0.05}}
split: {{validation_fraction: 0.1, test_fraction: 0.1}}
model: {{base: {model}, method: lora, lora: {{r: 4, alpha: 8, dropout: 0.0}}}}
training: {{max_steps: 10, per_device_train_batch_size: 4, learning_rate: 0.005, max_length: 256,
           max_eval_samples: 16, seed: 7}}
runtime: {{logging_steps: 2}}
sweep:
  enabled: true
  n_trials: 2
  max_steps: 2
  pruner: none
  search_space:
    learning_rate: {{type: float, low: 0.002, high: 0.01, log: true}}
evaluation: {{primary_metric: perplexity, max_samples: 6, max_new_tokens: 8, batch_size: 6, n_report_samples: 2}}
registry: {{model_name: mini-model}}
# the release in the train job, kept small: two formats, 2 load-test requests; the tiny model's perplexity is in the
# thousands, so max_drop (in the primary metric's units) is opened up: the e2e run checks the path, not the numbers
release: {{formats: [safetensors_bf16, gguf_q8_0], max_drop: 1.0e+6, load_test_requests: 2, load_test_concurrency: [1]}}
"""


def make_world(root: Path, tiny_model: Path, spec: str = SPEC) -> dict:
    """Two small drops taken from the demo files (same faults and duplicates, fewer rows) and a spec folder."""
    drops = write_demo_drops(root / "all")
    incoming = root / "incoming"
    incoming.mkdir()
    # two small drops taken from the demo files (same faults and duplicates, fewer rows)
    for i, p in enumerate(drops):
        lines = p.read_text().splitlines(keepends=True)
        (incoming / f"drop{i}.jsonl").write_text("".join(lines[:160]))
    (root / "specs").mkdir()
    (root / "specs" / "mini.yaml").write_text(spec.format(incoming=incoming, model=tiny_model))
    # MLflow's own variables are not inherited: the CLI must find the state root's store by itself
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "FINETUNE_HOME": str(root / "state"),
        "FINETUNE_SPECS": str(root / "specs"),
        "DAGSTER_HOME": str(REPO),
        "FINETUNE_DAGSTER_DIR": str(root / "state" / "dagster"),
    }
    return {"root": root, "env": env, "incoming": incoming, "model": tiny_model}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict:
    return make_world(tmp_path_factory.mktemp("e2e"), tiny_model)


def cli(world: dict, *args: str) -> str:
    out = subprocess.run(list(args), cwd=REPO, env=world["env"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(args)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return out.stdout + out.stderr


def dagster_cli(world: dict, *args: str) -> str:
    return cli(world, sys.executable, "-m", "dagster", *args, "-m", "finetune_pipeline.definitions")


DG = "import sys; from dagster_dg_cli.cli import main; sys.exit(main())"  # the `dg` script of this interpreter


def dg_cli(world: dict, *args: str) -> str:
    """`dg ARGS` in the repository (the dg project: pyproject's [tool.dg]); it prints no SupersessionWarning."""
    out = cli(world, sys.executable, "-c", DG, *args)
    assert "SupersessionWarning" not in out, out[-3000:]
    return out


def ingest_all(world: dict) -> list[str]:
    out = cli(world, sys.executable, "-m", "finetune_pipeline.cli", "register-drops")
    keys = [ln.split("registered drop ")[1].split()[0] for ln in out.splitlines() if "registered drop" in ln]
    for k in keys:
        dg_cli(world, "launch", "--assets", "mini/raw_dataset,mini/cleaned_dataset", "--partition", k)
    return keys


@pytest.fixture(scope="module")
def trained(world: dict) -> dict:
    """Ingest both drops and run the train job once; what it produced is kept as it was right after, so a test
    that runs the job again does not change what another test reads."""
    keys = ingest_all(world)
    assert len(keys) == 2
    # `dagster job execute` is how this project's users run jobs: it keeps working next to `dg launch --job`
    log = dagster_cli(world, "job", "execute", "-j", "mini_train")
    with instance_of(world) as instance:
        cleaned = instance.get_materialized_partitions(dg.AssetKey(["mini", "cleaned_dataset"]))
        names = ("dataset_splits", "adapter", "token_stats", "eval_report", "registered_model")
        return {"keys": keys, "log": log, "cleaned": cleaned, **{n: latest(instance, n) for n in names}}


@pytest.fixture()
def env(world: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    for k in ("FINETUNE_HOME", "FINETUNE_SPECS", "DAGSTER_HOME", "FINETUNE_DAGSTER_DIR"):
        monkeypatch.setenv(k, world["env"][k])
    return world


@contextlib.contextmanager
def instance_of(world: dict) -> Iterator[dg.DagsterInstance]:
    """The world's Dagster instance (dagster.yaml in DAGSTER_HOME, storage under its state root)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in ("FINETUNE_HOME", "FINETUNE_SPECS", "DAGSTER_HOME", "FINETUNE_DAGSTER_DIR"):
            mp.setenv(k, world["env"][k])
        with dg.DagsterInstance.get() as instance:
            yield instance


def mlflow_client(world: dict):  # type: ignore[no-untyped-def]
    import mlflow

    uri = f"sqlite:///{world['root'] / 'state' / 'mlflow' / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def tracker_of(world: dict):  # type: ignore[no-untyped-def]
    """The world's pipeline Tracker (its own client on the state root's store)."""
    from finetune_pipeline.tracking.mlflow_store import TrackingTarget
    from finetune_pipeline.tracking.tracker import Tracker

    return Tracker(TrackingTarget(f"sqlite:///{world['root'] / 'state' / 'mlflow' / 'mlflow.db'}", None), "mini")


def latest(instance: dg.DagsterInstance, name: str) -> dict:
    ev = instance.get_latest_materialization_event(dg.AssetKey(["mini", name]))
    assert ev is not None, f"mini/{name} was never materialized"
    return {k: v.value for k, v in ev.asset_materialization.metadata.items()} | {
        "_version": ev.asset_materialization.tags.get("dagster/data_version"),
        "_run": ev.run_id,
    }


def test_pipeline_trains_evaluates_and_registers(trained: dict, env: dict) -> None:
    import torch
    from peft import get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from finetune_pipeline.models.merge import max_logit_diff, tuned_model
    from finetune_pipeline.spec import load_spec
    from finetune_pipeline.training.configs import lora_config

    assert trained["cleaned"] == set(trained["keys"])
    splits = trained["dataset_splits"]
    assert splits["train_rows"] > 200 and splits["test_rows"] > 10 and splits["cross_drop_duplicates"] > 0
    adapter = trained["adapter"]
    assert adapter["reused"] is False and adapter["steps"] == 10

    # loss logged to MLflow and falling
    client = mlflow_client(env)
    exp = client.get_experiment_by_name("mini")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert {"sweep", "trial-0", "trial-1", "train", "eval", "register"} <= set(runs)
    history = client.get_metric_history(adapter["mlflow_run_id"], "train_loss")
    assert len(history) == 5 and history[-1].value < history[0].value
    # sweep trials are nested runs under the sweep run
    assert runs["trial-0"].data.tags["mlflow.parentRunId"] == runs["sweep"].info.run_id

    # every LoRA weight changed: B starts at zero, A differs from its seeded initialisation
    spec = load_spec(Path(env["env"]["FINETUNE_SPECS"]) / "mini.yaml").spec
    weights = load_file(Path(adapter["path"]) / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(env["model"])
    set_seed(spec.training.seed)
    init = {
        k.replace(".default", ""): v
        for k, v in get_peft_model(base, lora_config(spec.model.lora)).state_dict().items()
        if "lora_" in k
    }
    assert weights and set(weights) == set(init)
    for k, w in weights.items():
        assert not torch.equal(w, init[k]), f"{k} did not change"

    # token statistics of the splits against training.max_length
    tokens = trained["token_stats"]
    assert tokens["train_tokens"]["rows"] == splits["train_rows"] and tokens["train_tokens"]["p50"] > 10
    assert tokens["max_length"] == spec.training.max_length and "data:image/png;base64" in tokens["histogram"]

    # eval report and the blocking gate
    report = trained["eval_report"]
    assert report["tuned"]["perplexity"] < report["base"]["perplexity"]
    assert "| perplexity |" in report["report"]
    with instance_of(env) as instance:
        checks = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(dg.AssetKey(["mini", "eval_report"]), "tuned_beats_base"), limit=50
        )
    assert [c.status.value for c in checks if c.run_id == report["_run"]] == ["SUCCEEDED"]

    # registered version with aliases, lineage tags, dataset digests equal to Dagster's
    reg = trained["registered_model"]
    mv = client.get_model_version_by_alias("mini-model", "champion")
    assert str(mv.version) == reg["version"] == "1" and reg["promoted"] is True
    assert set(reg["aliases"]) == {"challenger", "champion"}
    t = mv.tags
    for tag in ("train_run_id", "sweep_run_id", "eval_run_id", "register_run_id"):
        assert t[f"finetune.{tag}"] in {r.info.run_id for r in runs.values()}
    assert t["finetune.splits_version"] == splits["_version"]
    assert {t[f"finetune.dataset_digest.{s}"] for s in ("train", "validation", "test")} == {
        splits["train_digest"],
        splits["validation_digest"],
        splits["test_digest"],
    }
    assert set(t["finetune.drops"].split(",")) == set(trained["keys"])
    train_run = client.get_run(t["finetune.train_run_id"])
    assert train_run.data.tags["dagster.run_id"] == adapter["_run"]
    assert train_run.data.tags["dagster.asset_key"] == "mini/adapter"
    assert train_run.data.tags["finetune.spec_hash"]
    # MLflow 3: the version comes from a LoggedModel whose source run is the training run (with its datasets)
    assert mv.run_id == t["finetune.train_run_id"] and mv.source.startswith("models:/m-")
    inputs = {d.dataset.name: d.dataset.digest for d in train_run.inputs.dataset_inputs}
    assert inputs == {
        "mini/dataset_splits/train": splits["train_digest"],
        "mini/dataset_splits/validation": splits["validation_digest"],
    }

    # the registered model reloads and gives the trained adapter's logits
    served, _ = tracker_of(env).load_version("mini-model", str(mv.version))
    tok = AutoTokenizer.from_pretrained(adapter["path"])
    diff = max_logit_diff(tuned_model(str(env["model"]), spec.model, adapter["path"]), served, tok)
    assert diff < 1e-4

    # lineage command follows the champion back to its runs and datasets
    out = cli(env, sys.executable, "-m", "finetune_pipeline.cli", "lineage", "models:/mini-model@champion")
    chain = json.loads(out[out.index("{") :])
    assert chain["runs"]["train_run_id"]["datasets"][0]["digest"] in {
        splits["train_digest"],
        splits["validation_digest"],
    }
    assert {d["digest"] for d in chain["logged_model"]["datasets"]} == {
        splits["train_digest"],
        splits["validation_digest"],
        splits["test_digest"],
    }


def test_unchanged_data_does_not_retrain_and_new_drop_triggers_schedule(trained: dict, env: dict) -> None:
    from finetune_pipeline.definitions import build_definitions
    from finetune_pipeline.defs.resources import StateStore

    client = mlflow_client(env)
    exp = client.get_experiment_by_name("mini")
    n_runs = len(client.search_runs([exp.experiment_id]))
    versions = len(client.search_model_versions("name = 'mini-model'"))
    dg_cli(env, "launch", "--job", "mini_train")
    with instance_of(env) as instance:
        adapter = latest(instance, "adapter")
        sweep = latest(instance, "hyperparameter_sweep")
    assert adapter["reused"] is True and adapter["adapter_key"] == trained["adapter"]["adapter_key"]
    assert sweep["trials_run_now"] == 0 and sweep["reused"] is True
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == n_runs, "unchanged data must not start a sweep, trial, train, eval or register run"
    assert len(client.search_model_versions("name = 'mini-model'")) == versions

    defs = build_definitions(Path(env["env"]["FINETUNE_SPECS"]))
    # resolve with a live instance in Dagster's context variable (one left by an earlier test may be collected)
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test(temp_dir=tmp):
        schedule = defs.resolve_schedule_def("mini_retrain_schedule")
    state = {"state": StateStore()}
    with instance_of(env) as instance:
        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources=state))
    assert not tick.run_requests and "unchanged" in tick.skip_message

    # a new drop lands: the schedule now asks for a retrain
    lines = sorted((env["root"] / "all").glob("*.jsonl"))[0].read_text().splitlines(keepends=True)
    (env["incoming"] / "drop_new.jsonl").write_text("".join(lines[400:480]))
    assert len(ingest_all(env)) == 1
    with instance_of(env) as instance:
        tick = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources=state))
    assert len(tick.run_requests) == 1


def test_failed_gate_never_registers(tmp_path: Path, tiny_model: Path) -> None:
    """A bar the tuned model cannot pass: the blocking check fails the run after training and before registration."""
    spec = SPEC.replace(
        "registry: {{model_name: mini-model}}",
        "registry: {{model_name: mini-model, min_improvement_over_base: 1.0e+9}}",
    ).replace("  enabled: true\n", "  enabled: false\n")  # the gate is what is tested: no sweep before training
    assert spec.count("min_improvement_over_base") == 1 and "enabled: false" in spec
    w = make_world(tmp_path, tiny_model, spec)
    assert len(ingest_all(w)) == 2
    out = subprocess.run(
        [sys.executable, "-m", "dagster", "job", "execute", "-m", "finetune_pipeline.definitions", "-j", "mini_train"],
        cwd=REPO,
        env=w["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode != 0
    with instance_of(w) as instance:
        gate = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey(["mini", "eval_report"]), "tuned_beats_base")]
        )
        assert [e.status.value for e in gate.values()] == ["FAILED"]
        assert latest(instance, "adapter")["reused"] is False  # it trained: only the gate stopped it
        assert instance.get_latest_materialization_event(dg.AssetKey(["mini", "registered_model"])) is None
    client = mlflow_client(w)
    assert client.search_model_versions("name = 'mini-model'") == []


# ---- the UIs in a real browser (Playwright + Debian's chromium) ------------------------------------------------


def ui_walkthrough(world: dict, shots: Path) -> dict[str, str]:
    """Start the Dagster UI, the MLflow UI and optuna-dashboard on 127.0.0.1 against the world's finished run, open
    the pages a user reads, assert what they must show, and screenshot each into ``shots``. Returns page texts."""
    from finetune_pipeline_tests.ui_driver import browser_page, chromium_or_skip, free_port, server

    chromium = chromium_or_skip()
    shots.mkdir(parents=True, exist_ok=True)
    state = Path(world["env"]["FINETUNE_HOME"])
    store = f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"
    d, m, o = free_port(), free_port(), free_port()
    py = sys.executable
    dagster_ui = [py, "-m", "dagster_webserver", "-h", "127.0.0.1", "-p", str(d), "-m", "finetune_pipeline.definitions"]
    mlflow_ui = [py, "-m", "mlflow", "ui", "--backend-store-uri", store, "-h", "127.0.0.1", "-p", str(m)]
    optuna_ui = [str(Path(py).parent / "optuna-dashboard"), f"sqlite:///{state / 'optuna' / 'optuna.db'}"]
    optuna_ui += ["--host", "127.0.0.1", "--port", str(o)]
    texts: dict[str, str] = {}
    env = world["env"]
    with (
        server(dagster_ui, env, f"http://127.0.0.1:{d}/server_info", shots / "dagster-webserver.log"),
        server(mlflow_ui, env, f"http://127.0.0.1:{m}/health", shots / "mlflow-ui.log"),
        server(optuna_ui, env, f"http://127.0.0.1:{o}/dashboard", shots / "optuna-dashboard.log"),
        browser_page(chromium) as page,
    ):

        def visit(name: str, url: str, must_show: list[str]) -> str:
            page.goto(url)
            for text in must_show:  # waits until the page's data has loaded
                page.get_by_text(text, exact=False).first.wait_for()
            page.screenshot(path=str(shots / f"{name}.png"))
            texts[name] = page.inner_text("body")
            return texts[name]

        def rendered_image(key: str, alt: str, name: str) -> None:
            """The metadata row ``key`` holds a markdown image: open it as a user does and check it rendered."""
            row = page.locator("tr", has_text=key).first
            row.scroll_into_view_if_needed()
            row.get_by_text("Show Markdown").click()
            img = page.locator(f"img[alt='{alt}']").first
            img.wait_for()
            assert img.get_attribute("src").startswith("data:image/png;base64,"), alt
            assert img.evaluate("el => el.complete && el.naturalWidth > 100"), f"the {alt} image did not render"
            img.screenshot(path=str(shots / f"{name}.png"))
            page.keyboard.press("Escape")

        dagster = f"http://127.0.0.1:{d}/assets/mini"
        # the adapter's metadata table (its training figures) and its loss plot
        text = visit("dagster-adapter", f"{dagster}/adapter", ["adapter_key", "tokens_per_second"])
        for key in ("eval_loss", "flop_utilisation", "lora_tensors_changed", "loss_curve"):
            assert key in text, f"adapter metadata lacks {key}"
        rendered_image("loss_curve", "loss curve", "dagster-adapter-loss-curve")
        # the evaluation: its table and the interval plot
        text = visit("dagster-eval-report", f"{dagster}/eval_report", ["primary_metric"])
        assert "intervals_plot" in text
        rendered_image("intervals_plot", "intervals", "dagster-eval-report-intervals")
        # the registered model: version, aliases and the model card
        text = visit("dagster-registered-model", f"{dagster}/registered_model", ["model_card", "champion"])
        assert "mini-model" in text and "promotion_reason" in text
        row = page.locator("tr", has_text="model_card").first
        row.scroll_into_view_if_needed()
        row.get_by_text("Show Markdown").click()
        card = page.get_by_role("dialog")
        card.get_by_text("Fine-tuned by finetune_pipeline").wait_for()
        assert "Evaluation (" in card.inner_text() and "Decision:" in card.inner_text()
        page.screenshot(path=str(shots / "dagster-model-card.png"))
        page.keyboard.press("Escape")
        # MLflow: the champion version's page carries the card (its description) and the aliases
        text = visit(
            "mlflow-model-version",
            f"http://127.0.0.1:{m}/#/models/mini-model/versions/1",
            ["Fine-tuned by finetune_pipeline", "champion"],
        )
        assert "Evaluation (" in text and "finetune.adapter_key" in text
        # ... and links the MLflow 3 LoggedModel it was registered from: its page shows the datasets the model
        # learned from and was scored on, and its metrics, each with the split it was measured on
        source = page.locator("a[href*='/models/m-']").first
        source.wait_for()  # the source model's link (the version's source is models:/<model id>)
        source.click()
        text = visit("mlflow-logged-model", page.url, ["Datasets used", "train_loss"])
        for shown in ("mini/dataset_splits/train", "mini/dataset_splits/test", "eval_loss", "tuned.perplexity"):
            assert shown in text, f"the LoggedModel page lacks {shown}"
        # optuna-dashboard: the sweep's study with its trials
        import optuna

        studies = optuna.get_all_study_names(f"sqlite:///{state / 'optuna' / 'optuna.db'}")
        assert studies, "the sweep left no study"
        visit("optuna-dashboard", f"http://127.0.0.1:{o}/dashboard", [studies[0], "Direction: MINIMIZE"])
        page.get_by_text(studies[0]).first.click()
        text = visit("optuna-dashboard-study", page.url, ["Best Trial"])
        assert "learning_rate" in text, "the study page shows no sampled parameter"
    return texts


def test_ui_pages_in_a_browser(trained: dict, env: dict, tmp_path: Path) -> None:
    """The Dagster UI, the MLflow UI and optuna-dashboard, as a user opens them after a finished run: the adapter's
    metadata table and loss plot, the eval report's interval plot, the model card, the version page, the studies."""
    shots = tmp_path / "screenshots"
    ui_walkthrough(env, shots)
    print(f"screenshots: {sorted(p.name for p in shots.glob('*.png'))} in {shots}")
    assert len(list(shots.glob("*.png"))) == 10
