"""Expert backends. ``create_backend`` maps a yaml ``backend`` name to its class."""

from __future__ import annotations

from coe.experts.base import Backend, Generation, GenRequest


def create_backend(config, base_dir=None) -> Backend:
    if config.backend == "llamacpp":
        from coe.experts.llamacpp import LlamaCppBackend as cls
    elif config.backend == "openai":
        from coe.experts.openai_api import OpenAIBackend as cls
    elif config.backend == "vllm":
        from coe.experts.vllm_backend import VLLMBackend as cls
    elif config.backend == "replay":
        from coe.experts.replay import ReplayBackend as cls
    else:  # the config schema rejects other names first
        raise ValueError(f"unknown backend {config.backend!r}")
    return cls(config, base_dir)


__all__ = ["Backend", "Generation", "GenRequest", "create_backend"]
