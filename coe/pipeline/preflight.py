"""Checks a pool before any model is loaded: every expert passes its backend's ``check`` (the
model file resolves, the API key variable is set, vllm is importable...), a trained router
knows only the pool's categories, profiles cover every expert. Raises one ``ConfigError`` line
for the first fault."""

from __future__ import annotations

from coe.core.config import PoolConfig
from coe.core.errors import CoeError, ConfigError
from coe.core.registry import BACKENDS
from coe.learned.classifier import load_for_pool
from coe.learned.profiles import Profiles


def check_pool(cfg: PoolConfig) -> None:
    for e in cfg.experts:
        try:
            BACKENDS.get(e.backend).check(e, cfg.base_dir)
        except CoeError as err:
            raise ConfigError(f"{cfg.source}: expert {e.name!r}: {err}") from None
    if cfg.router.model_file:
        load_for_pool(cfg)
    if cfg.router.kind == "skill" or cfg.router.profiles:
        path = cfg.resolve_path(cfg.router.profiles) if cfg.router.profiles else None
        if path is None:
            raise ConfigError(f"{cfg.source}: router 'skill' needs router.profiles (coe profile)")
        Profiles.load(path).check_pool(cfg, str(path))
