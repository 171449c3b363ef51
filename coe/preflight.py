"""Checks a pool before any model is loaded: every model file resolves, every API key env var
is set, every vLLM expert can import vllm, a trained router knows only the pool's categories,
profiles cover every expert. Raises one ``ConfigError`` line for the first fault."""

from __future__ import annotations

import importlib.util
import os

from coe.config import PoolConfig
from coe.errors import CoeError, ConfigError
from coe.experts.model_ref import resolve_model_file


def check_pool(cfg: PoolConfig) -> None:
    for e in cfg.experts:
        where = f"{cfg.source}: expert {e.name!r}"
        try:
            if e.backend == "llamacpp":
                resolve_model_file(e.model, cfg.base_dir)
            elif e.backend == "replay":
                resolve_model_file(e.model, cfg.base_dir, suffix=".jsonl")
            elif e.backend == "openai" and e.api_key_env and not os.environ.get(e.api_key_env):
                raise ConfigError(f"environment variable {e.api_key_env} is not set")
            elif e.backend == "vllm" and importlib.util.find_spec("vllm") is None:
                raise ConfigError("backend 'vllm' needs the vllm package (pip install 'coe[vllm]')")
        except CoeError as err:
            raise ConfigError(f"{where}: {err}") from None
    if cfg.router.model_file:
        from coe.routers.learned import load_for_pool

        load_for_pool(cfg)
    if cfg.router.kind == "skill" or cfg.router.profiles:
        from coe.profiles import Profiles

        path = cfg.resolve_path(cfg.router.profiles) if cfg.router.profiles else None
        if path is None:
            raise ConfigError(f"{cfg.source}: router 'skill' needs router.profiles (coe profile)")
        Profiles.load(path).check_pool(cfg, str(path))
