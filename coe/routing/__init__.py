"""Routers: ``all``, ``category`` (CoE two-step) and ``skill`` (Symbolic-MoE recruiting), and
any registered in ``coe.core.registry.ROUTERS`` (by the API or a ``coe.routing`` entry point)."""

from __future__ import annotations

from coe.core.registry import ROUTERS
from coe.routing.base import Recruit, Route, Router


def build_router(kind: str, config, executor=None, k: int | None = None) -> Router:
    """The router registered as ``kind``, built for ``config``; an unknown kind is a one-line
    ConfigError listing the known ones."""
    return ROUTERS.get(kind).from_config(config, executor=executor, k=k)


__all__ = ["ROUTERS", "Recruit", "Route", "Router", "build_router"]
