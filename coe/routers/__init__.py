"""Routers: ``all``, ``category`` (CoE two-step) and ``skill`` (Symbolic-MoE recruiting)."""

from __future__ import annotations

from coe.errors import ConfigError
from coe.routers.base import Recruit, Route, Router

ROUTERS = ("all", "category", "skill")


def build_router(kind: str, config, executor=None, k: int | None = None) -> Router:
    if kind == "all":
        from coe.routers.all import AllRouter

        return AllRouter(config, k)
    if kind == "category":
        from coe.routers.category import CategoryRouter

        classifier = None
        if config.router.model_file:  # a trained classifier (coe train-router)
            from coe.routers.learned import load_for_pool

            classifier = load_for_pool(config)
        return CategoryRouter(config, k, classifier=classifier)
    if kind == "skill":
        from coe.routers.skill import build_skill_router

        return build_skill_router(config, executor, k)
    raise ConfigError(f"unknown router {kind!r} (expected one of {', '.join(ROUTERS)})")


__all__ = ["ROUTERS", "Recruit", "Route", "Router", "build_router"]
