"""finetune_pipeline: declarative LLM fine-tuning pipelines on Dagster.

``finetune_pipeline.FineTunePipeline`` is the Dagster Component (``type: finetune_pipeline.FineTunePipeline`` in a
defs.yaml); it is imported on first use only, so importing the library does not import dagster.
"""

import os
from typing import Any

__version__ = "0.1.0"

# transformers >= 5.2x loads "hub kernels" (code downloaded from the Hub at model load) unless told not to; where the
# `kernels` package is missing, every from_pretrained then fails ("Kernels are not available"), seen on a CUDA
# machine. Remote code stays off by default here, like trust_remote_code: export USE_HUB_KERNELS=1 to opt in.
os.environ.setdefault("USE_HUB_KERNELS", "0")

_LAZY = {"FineTunePipeline": "finetune_pipeline.defs.component"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune_pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
