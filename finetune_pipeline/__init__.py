"""finetune_pipeline: declarative LLM fine-tuning pipelines on Dagster."""

__version__ = "0.1.0"
