"""Expert backends: llama.cpp (CPU, in process), any OpenAI-compatible API, vLLM (GPU), and
replays of recorded outputs. ``create_backend`` makes the backend a yaml expert names through
the backend registry (``coe.core.registry.BACKENDS``), where plugins add their own."""

from __future__ import annotations

from coe.backends.base import Backend, Capabilities, run_sync
from coe.core.registry import BACKENDS
from coe.core.types import Generation, GenRequest


def create_backend(config, base_dir=None) -> Backend:
    return BACKENDS.get(config.backend)(config, base_dir)


__all__ = ["BACKENDS", "Backend", "Capabilities", "Generation", "GenRequest", "create_backend", "run_sync"]
