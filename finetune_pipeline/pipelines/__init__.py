"""The dg project's defs folder: one sub-folder per FineTunePipeline component instance (``NAME/defs.yaml``).

``dg scaffold defs finetune_pipeline.FineTunePipeline NAME`` writes one here; finetune_pipeline.definitions loads
them next to the specs in ``specs/``. (Pipelines may live in either place; their names must differ.)
"""
