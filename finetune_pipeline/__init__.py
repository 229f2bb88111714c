"""finetune_pipeline: declarative LLM fine-tuning pipelines on Dagster."""

import os

__version__ = "0.1.0"

# transformers >= 5.2x loads "hub kernels" (code downloaded from the Hub at model load) unless told not to; where the
# `kernels` package is missing, every from_pretrained then fails ("Kernels are not available"), seen on a CUDA
# machine. Remote code stays off by default here, like trust_remote_code: export USE_HUB_KERNELS=1 to opt in.
os.environ.setdefault("USE_HUB_KERNELS", "0")
