"""`finetune-pipeline`: register dropped files, run the demo end to end through the dg CLI, trace lineage.

finetune-pipeline demo [--pipeline ticket_triage]   ingest every drop, then train/eval/register
finetune-pipeline register-drops                     add a partition per finished file (what the sensor does)
finetune-pipeline lineage models:/NAME@champion      follow a registered model back to its runs and drops
finetune-pipeline promote NAME VERSION --reason "..."  move champion to a verified version (history kept)
finetune-pipeline rollback NAME --reason "..."          give champion back to the previous champion
finetune-pipeline serve NAME[@ALIAS] [--port 8000]    OpenAI-compatible API for a registered model (alias champion)
finetune-pipeline env                                print the environment the dg / dagster CLIs need (eval it)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from finetune_pipeline.layout import StateLayout
from finetune_pipeline.paths import (
    DATABASES,
    PROJECT_ROOT,
    SPECS_ENV,
    STATE_ENV,
    postgres_profile,
    specs_dir,
    state_root,
)

POSTGRES_DAGSTER_HOME = Path("deploy") / "postgres"  # the instance config of the PostgreSQL profile


def dagster_env() -> dict[str, str]:
    """DAGSTER_HOME (folder of dagster.yaml) and the state root Dagster writes to, derived from FINETUNE_HOME;
    with FINETUNE_POSTGRES_URL, the PostgreSQL instance config and the URL of Dagster's database."""
    root = state_root()
    pg = postgres_profile()
    home = os.environ.get("DAGSTER_HOME") or str(Path.cwd() / POSTGRES_DAGSTER_HOME if pg else Path.cwd())
    if not (Path(home) / "dagster.yaml").exists():
        raise SystemExit(f"no dagster.yaml in {home}: run from the repository root or set DAGSTER_HOME")
    env = {
        STATE_ENV: str(root),
        "DAGSTER_HOME": home,
        "FINETUNE_DAGSTER_DIR": os.environ.get("FINETUNE_DAGSTER_DIR") or str(StateLayout(root).dagster),
    }
    if pg is not None:
        env["FINETUNE_DAGSTER_POSTGRES_URL"] = pg.url("dagster")
    mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI") or (pg.url("mlflow") if pg else None)
    env["FINETUNE_MLFLOW_BACKEND_URI"] = mlflow_uri or f"sqlite:///{StateLayout(root).mlflow_db}"  # for `mlflow ui`
    optuna_uri = os.environ.get("FINETUNE_OPTUNA_STORAGE") or (pg.url("optuna") if pg else None)
    env["FINETUNE_OPTUNA_URI"] = optuna_uri or f"sqlite:///{StateLayout(root).optuna_db}"  # for optuna-dashboard
    return env


def postgres_init() -> list[str]:
    """Create the profile's databases on the FINETUNE_POSTGRES_URL server where missing; returns those created."""
    import psycopg2

    pg = postgres_profile()
    if pg is None:
        raise SystemExit("set FINETUNE_POSTGRES_URL=postgresql://USER:PASSWORD@HOST:PORT first")
    created = []
    conn = psycopg2.connect(pg.database_url("postgres"))
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in DATABASES.values():
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{db}"')
                created.append(db)
    conn.close()
    print(f"databases {sorted(DATABASES.values())} ready ({', '.join(created) or 'none'} created)")
    return created


def _apply_env() -> dict[str, str]:
    env = dagster_env()
    os.environ.update(env)
    Path(env["FINETUNE_DAGSTER_DIR"]).mkdir(parents=True, exist_ok=True)
    return env


def register_drops(pipeline: str | None = None) -> dict[str, list[str]]:
    """Register every finished file in each pipeline's incoming folder as a partition; returns new keys."""
    import dagster as dg

    from finetune_pipeline.data.drops import completion_rules, scan_incoming
    from finetune_pipeline.defs.common import drops_partitions_name
    from finetune_pipeline.paths import specs_dir
    from finetune_pipeline.spec import load_specs_report

    _apply_env()
    instance = dg.DagsterInstance.get()
    added: dict[str, list[str]] = {}
    specs, broken = load_specs_report(specs_dir())
    for path, problems in broken.items():
        print(f"{path}: broken spec skipped:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
    from finetune_pipeline.defs.component import component_specs  # the defs folder's FineTunePipeline components

    specs += [s for s in component_specs() if s.name not in {t.name for t in specs}]
    for spec in specs:
        if pipeline and spec.name != pipeline:
            continue
        name = drops_partitions_name(spec.name)
        known = set(instance.get_dynamic_partitions(name))
        added[spec.name] = []
        for src in spec.source_list():  # every source's folder
            inc = spec.incoming_of(src)
            # Two looks, settle_seconds apart (at least 1 s): a file still being written changes in between.
            first = scan_incoming(inc, src.file_glob, 0, {}, known, **completion_rules(src))
            time.sleep(max(1.0, src.settle_seconds))
            scan = scan_incoming(inc, src.file_glob, src.settle_seconds, first.seen, known, **completion_rules(src))
            keys = [d.key for d in scan.ready if d.key not in known]
            if keys:
                instance.add_dynamic_partitions(name, keys)
            known |= set(keys)
            added[spec.name] += keys
            for d in scan.ready:
                print(f"{spec.name}: registered drop {d.key} <- {d.path.name} (source {src.name})")
            if scan.waiting:
                print(
                    f"{spec.name}: {len(scan.waiting)} file(s) not finished, not registered: {scan.waiting_summary(20)}"
                )
    return added


def _dg(*args: str) -> None:
    """Dagster's `dg` CLI (dagster-dg-cli) in this project: the code location is pyproject's [tool.dg.project]."""
    cmd = [sys.executable, "-c", "import sys; from dagster_dg_cli.cli import main; sys.exit(main())", *args]
    print("$ dg " + " ".join(args), flush=True)
    env = {**os.environ, SPECS_ENV: str(specs_dir()), STATE_ENV: str(state_root())}  # absolute: dg runs in the project
    subprocess.run(cmd, check=True, cwd=PROJECT_ROOT, env=env)


def demo(pipeline: str) -> None:
    import dagster as dg

    from finetune_pipeline.defs.common import drops_partitions_name

    env = _apply_env()
    t0 = time.perf_counter()
    register_drops(pipeline)
    instance = dg.DagsterInstance.get()
    drops = instance.get_dynamic_partitions(drops_partitions_name(pipeline))
    cleaned = instance.get_materialized_partitions(dg.AssetKey([pipeline, "cleaned_dataset"]))
    for d in drops:
        if d in cleaned:
            print(f"drop {d} already ingested")
            continue
        _dg("launch", "--assets", f"{pipeline}/raw_dataset,{pipeline}/cleaned_dataset", "--partition", d)
    _dg("launch", "--job", f"{pipeline}_train")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s; state under {env[STATE_ENV]}")
    _summary(pipeline)


def _summary(pipeline: str) -> None:
    import dagster as dg

    instance = dg.DagsterInstance.get()
    for asset in ("eval_report", "registered_model"):
        ev = instance.get_latest_materialization_event(dg.AssetKey([pipeline, asset]))
        if ev is None or ev.asset_materialization is None:
            print(f"{pipeline}/{asset}: not materialized")
            continue
        md = ev.asset_materialization.metadata
        if asset == "eval_report":
            print(md["report"].value.split("## Samples")[0])
        else:
            print(
                f"registered {md['model_uri'].value}, aliases {md['aliases'].value}, champion v{md['champion_version'].value}"
            )
            print(f"promotion: {md['promotion_reason'].value}")


def _tracker():  # type: ignore[no-untyped-def]
    """A registry-only Tracker on the state root's MLflow store (MLFLOW_TRACKING_URI or the PostgreSQL profile's
    database when set, as for `mlflow ui`)."""
    from finetune_pipeline.tracking.mlflow_store import TrackingTarget
    from finetune_pipeline.tracking.tracker import Tracker

    env = _apply_env()
    return Tracker(TrackingTarget(env["FINETUNE_MLFLOW_BACKEND_URI"], None))


def lineage(model_uri: str) -> None:
    print(json.dumps(_tracker().trace(model_uri), indent=2))


def promote(name: str, version: str, reason: str) -> None:
    from finetune_pipeline.stages.register import AliasRefused, promote_version

    try:
        prev = promote_version(_tracker(), name, version, reason)
    except AliasRefused as exc:
        raise SystemExit(str(exc)) from exc
    print(f"{name}: champion v{prev or '-'} -> v{version} ({reason})")


def rollback(name: str, reason: str) -> None:
    from finetune_pipeline.stages.register import AliasRefused
    from finetune_pipeline.stages.register import rollback as do_rollback

    try:
        old, new = do_rollback(_tracker(), name, reason)
    except AliasRefused as exc:
        raise SystemExit(str(exc)) from exc
    print(f"{name}: champion v{old} -> v{new} (rollback: {reason})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="finetune-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="ingest every drop, then train, evaluate and register")
    d.add_argument("--pipeline", default="ticket_triage")
    r = sub.add_parser("register-drops", help="register finished files as partitions")
    r.add_argument("--pipeline", default=None)
    li = sub.add_parser("lineage", help="trace a registered model back to its runs and data")
    li.add_argument("model_uri")
    pr = sub.add_parser("promote", help="move the champion alias to a verified version, with a reason")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--reason", required=True)
    rb = sub.add_parser("rollback", help="give the champion alias back to the previous champion")
    rb.add_argument("name")
    rb.add_argument("--reason", required=True)
    sv = sub.add_parser("serve", help="OpenAI-compatible API (/v1/chat/completions) for a registered model")
    sv.add_argument(
        "model", metavar="NAME[@ALIAS]", help="registered model, alias champion unless given (or NAME/VERSION)"
    )
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    sv.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for more requests")
    sv.add_argument("--batch-size", type=int, default=None, help="largest batch (default: evaluation.batch_size)")
    sv.add_argument("--spec", type=Path, default=None, help="the pipeline spec (default: the one registering NAME)")
    sub.add_parser("env", help="print shell exports for DAGSTER_HOME and the state root")
    sub.add_parser("postgres-init", help="create the PostgreSQL profile's databases (FINETUNE_POSTGRES_URL)")
    a = ap.parse_args(argv)
    if a.cmd == "demo":
        demo(a.pipeline)
    elif a.cmd == "register-drops":
        register_drops(a.pipeline)
    elif a.cmd == "lineage":
        lineage(a.model_uri)
    elif a.cmd == "postgres-init":
        postgres_init()
    elif a.cmd == "promote":
        promote(a.name, a.version, a.reason)
    elif a.cmd == "rollback":
        rollback(a.name, a.reason)
    elif a.cmd == "serve":
        from finetune_pipeline.serving.server import serve

        serve(
            a.model,
            a.host,
            a.port,
            max_tokens_limit=a.max_tokens_limit,
            batch_window_ms=a.batch_window_ms,
            batch_size=a.batch_size,
            spec_path=a.spec,
        )
    else:
        for k, v in dagster_env().items():
            print(f"export {k}={shlex.quote(v)}")


if __name__ == "__main__":
    main()
