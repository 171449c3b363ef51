"""Checks a pool before any model is loaded: every expert passes its backend's ``check`` (the
model file resolves, the API key variable is set, vllm is importable...), a trained router
knows only the pool's categories, profiles cover every expert. Raises one ``ConfigError`` line
for the first fault.

``files_read`` lists every file a command over the pool reads, for the one check every
command that writes runs first (``coe.io.output.check_output``): no output may be one of them.
"""

from __future__ import annotations

from pathlib import Path

from coe.core.config import PoolConfig
from coe.core.errors import CoeError, ConfigError
from coe.core.registry import BACKENDS
from coe.io.cache import cache_path
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


#: what ``files_read`` may leave out: the files a command produces itself
PROFILES, ROUTER_FILE = "profiles", "router file"


def files_read(cfg: PoolConfig, cache=True, produces: tuple[str, ...] = ()
               ) -> list[tuple[str, Path]]:
    """``(what, path)`` of every file a command over ``cfg`` reads: the yaml, each expert's
    local files (a replay's recording, a GGUF), the response cache (``cache`` as
    ``open_cache`` takes it), the trained router and the profiles with their validation
    record. ``produces`` leaves out the kinds the command writes itself (``coe profile``
    extends the profiles, ``coe train-router`` makes the router file)."""
    found: list[tuple[str, Path]] = [("config", Path(cfg.source))]
    for e in cfg.experts:
        kind = BACKENDS.get(e.backend)
        what = "recording" if kind.capabilities_for(e).replay_only else "model file"
        found += [(f"{what} of expert {e.name!r}", p) for p in kind.reads(e, cfg.base_dir)]
    db = cache_path(cfg, cache)
    if db is not None:
        found.append(("response cache", db))
    if cfg.router.model_file and ROUTER_FILE not in produces:
        found.append(("router file", cfg.resolve_path(cfg.router.model_file)))
    if PROFILES not in produces:
        for field, value in (("router.profiles", cfg.router.profiles),
                             ("aggregator.profiles", cfg.aggregator.profiles)):
            if value:
                path = cfg.resolve_path(value)
                found += [(f"profiles ({field})", path),
                          (f"validation record of the profiles ({field})",
                           path.with_suffix(".npz"))]
    return found
