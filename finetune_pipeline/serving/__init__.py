"""Serving a registered model: an OpenAI-compatible API (FastAPI + uvicorn) with a batching queue, generating
through the same function and chat template as evaluation; optional feedback drop of served requests."""
