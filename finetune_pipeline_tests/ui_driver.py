"""Servers on 127.0.0.1 and a headless browser for the UI tests: the Dagster UI, the MLflow UI and optuna-dashboard
started as a user starts them, and Debian's Chromium driven by Playwright.

Chromium is installed by the project's setup (`make setup-browser`, run by `make test`); where it cannot be, the
browser tests are skipped with the reason in the test summary.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Chromium's background services reach for Google's hosts at start; this machine's network refuses them.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_or_skip() -> str:
    """The path of Debian's Chromium, or a skip that says why the browser tier cannot run here."""
    path = os.environ.get("FINETUNE_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.skip("browser tier skipped: no chromium on PATH (install it with `make setup-browser`, as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        pytest.skip(f"browser tier skipped: playwright is not installed ({e}); `pip install -e '.[dev]'`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log when it exits or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode} before answering {url}:\n{log.read_text()[-4000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def server(cmd: list[str], env: dict[str, str], ready: str, log: Path) -> Iterator[subprocess.Popen]:
    """Start ``cmd`` in its own process group, wait until ``ready`` answers, stop the whole group afterwards."""
    bin_dir = str(Path(sys.executable).parent)  # mlflow execs uvicorn by name
    env = {**env, "PATH": bin_dir + os.pathsep + env.get("PATH", os.environ.get("PATH", ""))}
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http(ready, proc, log)
            yield proc
        finally:
            for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 10)):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)


@contextlib.contextmanager
def browser_page(chromium: str) -> Iterator[Any]:
    """A Playwright page in headless Debian Chromium (fresh profile), 1400x1000."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()
