"""The route stage of an evaluation: every strategy's routes on every question set.

Routers are built with the public ``build_router`` and run through the pipeline's route stage
(``coe.pipeline.route``), once per (router, k, budget) and shared by the strategies that use
them. A router that cannot be built for this pool is skipped with why, as is a strategy whose
aggregator would be a replay expert or lacks its trained part. A router reading a trained file
that is not cross-fitted gets a note: its validation figures may be in-sample.
"""

from __future__ import annotations

import numpy as np

from coe.aggregation import Aggregator, build_aggregator
from coe.apps.eval.result import QuestionSet
from coe.apps.eval.strategies import StrategySpec, has_categories, random_table
from coe.core.errors import ConfigError
from coe.pipeline.route import route
from coe.pipeline.routes import RouteTable
from coe.routing import Router, build_router


def route_strategies(job) -> None:
    """The routes of every strategy on every question set (best-single's come with its
    pick). A router that cannot serve this pool, or a model-using aggregator that would be
    a replay, is skipped with why."""
    routed: dict[tuple[str, int | None], tuple[dict | None, str, str]] = {}
    for s in job.specs:
        if s.name in job.skipped or s.kind == "best-single":
            continue
        if s.kind in ("single", "random", "oracle"):
            for qs in job.sets:
                qs.routes_of[s.name] = _fixed_routes(job, s, qs)
            continue
        k = s.k or (None if s.router == "all" else job.config.router.k)
        if s.budget is not None and s.k is None and job.config.router.budget is None:
            k = None  # a cascade the yaml does not set: its depth is chosen on validation
        key = (s.router, k, s.budget, s.budget_mode)
        if key not in routed:
            routed[key] = _route_with(job, s.router, k, s.budget, s.budget_mode)
        tables, why, in_sample = routed[key]
        why = (why or _replayed_aggregator(job, s, [t for t, _ in tables.values()])
               or _untrained_aggregator(job, s))
        if why:
            job.skipped[s.name] = why
            continue
        for qs in job.sets:
            qs.routes_of[s.name], qs.route_seconds[s.name] = tables[qs.name]
        job.router_k[s.name] = k
        if key in job.cascade_of:
            job.cascades[s.name] = job.cascade_of[key]
            job.router_k[s.name] = job.cascade_of[key].max_experts
        if in_sample:
            job.in_sample[s.name] = in_sample


def _fixed_routes(job, s: StrategySpec, qs: QuestionSet) -> RouteTable:
    if s.kind == "single":
        return RouteTable.fixed(qs.ids, job.names, [s.expert], "single expert",
                                confidence=1.0)
    if s.kind == "random":
        return random_table(qs.ids, job.names, s.k, job.opts.seed)
    return RouteTable.fixed(qs.ids, job.names, job.names, "every expert (oracle)")


def _route_with(job, kind: str, k: int | None, budget: float | None = None,
                budget_mode: str | None = None) -> tuple[dict | None, str, str]:
    """({question set: (routes, seconds)}, why the router is unavailable ("" if it is
    not), why its validation routes may be in-sample ("" if they may not)). With
    ``budget``, the router cascades: its routes are every recruit a question may ask,
    and its ``Cascade`` is kept in ``cascade_of``."""
    if kind == "category" and not has_categories(job.config):
        return None, "the pool declares no categories", ""
    config = job.config
    if budget is not None:
        config = config.model_copy(update={"router": config.router.model_copy(
            update={"budget": budget, "budget_mode": budget_mode or "cap", "k": k})})
    try:
        router = build_router(kind, config, job.executor, k)
        if budget is not None:
            if router.cascade is None:
                raise ConfigError(f"the {kind} router does not cascade")
            job.cascade_of[(kind, k, budget, budget_mode)] = router.cascade
        tables = {qs.name: _route_set(job, router, qs) for qs in job.sets}
    except Exception as e:  # an unavailable or unfit router: skip, say why
        return None, _unavailable(job, kind, k, budget, e), ""
    in_sample = ("" if job.val is None
                 else _trained_on(job, kind, k, router, tables["validation"][0]))
    return tables, "", in_sample


def _unavailable(job, kind: str, k: int | None, budget: float | None, e: Exception) -> str:
    """Why a router strategy cannot run, naming what failed: a cascade whose router routes
    well enough without its budget lacks what the cascade itself needs (the answer selector
    that decides when to stop), not the router."""
    why = f"{type(e).__name__}: {e}"
    if budget is not None:
        try:
            build_router(kind, job.config.model_copy(update={"router": job.config.router.model_copy(
                update={"budget": None})}), job.executor, k)
        except Exception:
            pass
        else:
            return f"the {kind} router's cascade cannot run (the {kind} router itself can): {why}"
    return f"{kind} router unavailable: {why}"


def _route_set(job, router: Router, qs: QuestionSet) -> tuple[RouteTable, float]:
    """The router's routes of one question set (the pipeline's route stage) and the seconds
    they took."""
    return route(router, qs.questions, job.names, blocks=job.executor.keeps_loaded,
                 unknown=job.config.expert)


def _trained_on(job, kind: str, k: int | None, router: Router,
                val_routes: RouteTable) -> str:
    """Why the router's validation routes may be in-sample ("" if not): it reads a trained
    file of the yaml (``router.model_file``, ``router.profiles``: without the file it
    routes otherwise, or cannot route) and does not say it scores the questions it was
    trained on out-of-fold (``Router.cross_fitted``). Whether the file was trained on
    these validation questions is not known here: the note says it may have been."""
    rc = job.config.router
    files = {f: v for f, v in (("model_file", rc.model_file), ("profiles", rc.profiles)) if v}
    if router.cross_fitted:
        return ""
    used = [f"router.{f} ({v})" for f, v in files.items()
            if not _routes_without(job, f, kind, k, val_routes)]
    if not used:
        return ""
    return (f"the {kind} router routes by {' and '.join(used)} and does not score the "
            "questions it was trained on out-of-fold (Router.cross_fitted is false): if "
            "that was trained on these validation questions, its validation figures are "
            "in-sample (optimistic)")


def _routes_without(job, field: str, kind: str, k: int | None,
                    val_routes: RouteTable) -> bool:
    """Whether the router routes the validation questions as it did with the yaml's
    ``router.<field>`` unset (False: it fails or routes otherwise: it uses the file)."""
    bare = job.config.model_copy(update={"router": job.config.router.model_copy(
        update={field: None})})
    try:
        plain, _ = _route_set(job, build_router(kind, bare, job.executor, k), job.val)
    except Exception:  # it needs the file
        return False
    return (np.array_equal(plain.experts, val_routes.experts)
            and np.array_equal(plain.weights, val_routes.weights))


def _aggregator(job, spec: StrategySpec) -> Aggregator:
    return build_aggregator(spec.aggregator, job.config, strength=job.strength,
                            expert=job.opts.aggregator_expert)


def _untrained_aggregator(job, spec: StrategySpec) -> str:
    """Why a strategy whose aggregator lacks its trained part (the learned selector) is
    skipped: it would only repeat another strategy (the learned aggregator votes)."""
    why = _aggregator(job, spec).unavailable
    return f"the {spec.aggregator} aggregator is not trained: {why}" if why else ""


def _replayed_aggregator(job, spec: StrategySpec, tables: list[RouteTable]) -> str:
    """Why a strategy whose aggregator would generate with a replay expert is skipped."""
    agg = _aggregator(job, spec)
    replayed = sorted({n for t in tables for n in agg.experts(t)} & job.replay)
    if not replayed:
        return ""
    return (f"the {spec.aggregator} aggregator would be a replay expert "
            f"({', '.join(replayed)}), which can only repeat its recorded answers "
            f"(use --aggregator-expert)")
