"""``coe serve``: the composition as an OpenAI-compatible service (FastAPI + uvicorn), with
micro-batching so each model still loads once per batch. Needs the ``serve`` extra."""

from coe.apps.serve.app import ServeOptions, create_app
from coe.apps.serve.server import run_server

__all__ = ["ServeOptions", "create_app", "run_server"]
