"""Where state lives: one root (``FINETUNE_HOME``, default ``./.finetune``) holds everything the pipelines produce."""

from __future__ import annotations

import os
from pathlib import Path

STATE_ENV = "FINETUNE_HOME"


def state_root() -> Path:
    """The state root, absolute. ``FINETUNE_HOME`` moves it; the default is ``.finetune`` under the working directory."""
    return Path(os.environ.get(STATE_ENV) or ".finetune").expanduser().resolve()


def models_dir() -> Path:
    """Folder for provisioned base models (safetensors folders)."""
    return state_root() / "models"
