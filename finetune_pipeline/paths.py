"""Where things are found from the environment: the state root (``FINETUNE_HOME``) and the specs folder
(``FINETUNE_SPECS``). What lives under the state root is the layout's business (finetune_pipeline.layout)."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "FINETUNE_HOME"
SPECS_ENV = "FINETUNE_SPECS"


def state_root() -> Path:
    """The state root, absolute. ``FINETUNE_HOME`` moves it; the default is ``.finetune`` under the working directory."""
    return Path(os.environ.get(STATE_ENV) or ".finetune").expanduser().resolve()


def specs_dir() -> Path:
    """The folder of pipeline specs: ``FINETUNE_SPECS``, default ``./specs``."""
    return Path(os.environ.get(SPECS_ENV) or "specs").expanduser().resolve()
