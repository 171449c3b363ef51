"""The strategies an evaluation compares, and how each one recruits experts per question.

Names (``--strategies`` takes a comma-separated list of names or shell patterns):

- ``single:<expert>``  every expert alone;
- ``best-single``      the expert most accurate on the *validation* questions, never the test;
- ``<router>+<agg>``   each registered router (``all``, ``category``, ``skill``, plugins) with
                       each registered aggregator but ``single`` (``vote``, ``llm``,
                       plugins); ``all+vote`` is the all-experts vote;
- ``<router>@1``       the router's first expert only (CoE's one-expert route);
- ``knn+learned~<b>`` a cascade (``coe.routing.cascade``): the knn router's recruits asked in rounds
                       until the answer selector is confident, at most ``b`` experts per
                       question on average on the validation record (``--budgets``, and the
                       yaml's ``router.budget``);
- ``random<k>+vote``   k experts drawn at random per question (seeded), voting;
- ``oracle``           right when any expert of the pool is right: the upper bound.
"""

from __future__ import annotations

import fnmatch
import random
from dataclasses import dataclass

import numpy as np

from coe.core.config import DEFAULT_CATEGORY, PoolConfig
from coe.core.errors import ConfigError
from coe.core.registry import AGGREGATORS, ROUTERS
from coe.core.types import Question, Route
from coe.pipeline.routes import RouteTable

DESCRIBE_AGGREGATOR = {"vote": "majority vote (ties: router weight, then strength)",
                       "llm": "an aggregator LLM reads their responses",
                       "learned": "the learned answer selector picks"}


def router_kinds() -> list[str]:
    return ROUTERS.names()


def aggregator_kinds() -> list[str]:
    """Aggregators combined with every router (``single`` is the single-expert strategies')."""
    return [a for a in AGGREGATORS.names() if a != "single"]


@dataclass
class StrategySpec:
    name: str
    kind: str  # single | best-single | router | random | oracle
    description: str
    router: str | None = None
    aggregator: str | None = None  # vote | llm | single; None for the oracle
    k: int | None = None
    expert: str | None = None  # for single
    budget: float | None = None  # a cascade's average experts per question (router.budget)


def all_specs(config: PoolConfig, random_k: int = 3,
              budgets: list[float] | tuple[float, ...] = ()) -> list[StrategySpec]:
    """Every strategy the pool could support, before availability checks; ``budgets``: the
    cascades to try (the yaml's ``router.budget`` is added when its router is knn)."""
    specs = [StrategySpec(f"single:{e.name}", "single", f"{e.name} alone",
                          aggregator="single", expert=e.name) for e in config.experts]
    specs.append(StrategySpec("best-single", "best-single",
                              "the expert most accurate on the validation questions",
                              aggregator="single"))
    for router in router_kinds():
        for agg in aggregator_kinds():
            what = "all experts" if router == "all" else f"{router} router's experts"
            how = DESCRIBE_AGGREGATOR.get(agg, f"the {agg} aggregator")
            specs.append(StrategySpec(f"{router}+{agg}", "router", f"{what}; {how}",
                                      router=router, aggregator=agg))
        if router != "all":
            specs.append(StrategySpec(f"{router}@1", "router",
                                      f"{router} router's first expert only",
                                      router=router, aggregator="vote", k=1))
    budgets = list(budgets)
    if config.router.kind == "knn" and config.router.budget is not None:
        budgets.append(config.router.budget)
    for b in sorted(set(budgets)):
        specs.append(StrategySpec(
            f"knn+learned~{b:g}", "router",
            f"knn router's recruits asked in rounds until the answer selector is confident: "
            f"at most {b:g} experts/question on average on validation",
            router="knn", aggregator="learned", budget=b))
    k = max(1, min(random_k, len(config.experts)))
    specs.append(StrategySpec(f"random{k}+vote", "random",
                              f"{k} experts drawn at random per question (seeded), voting; "
                              "ties to the first drawn",
                              aggregator="vote", k=k))
    specs.append(StrategySpec("oracle", "oracle", "right if any expert of the pool is right"))
    return specs


def select(specs: list[StrategySpec], patterns: str | list[str] | None) -> list[StrategySpec]:
    """The specs matching any of the comma-separated names or shell patterns (all if None)."""
    if not patterns:
        return list(specs)
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [s for s in specs if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in specs)]
    if unmatched:
        known = ", ".join(s.name for s in specs)
        raise ConfigError(f"--strategies: {', '.join(unmatched)} matches no strategy "
                          f"(known: {known})")
    return chosen


def has_categories(config: PoolConfig) -> bool:
    return any(c != DEFAULT_CATEGORY for c in config.category_names())


def random_routes(questions: list[Question], names: list[str], k: int, seed: int) -> list[Route]:
    """k distinct experts per question, drawn with a generator seeded by (seed, question id),
    so a question's draw does not depend on which other questions are in the set.

    The baseline knows nothing about the experts: the recruits are weighted by draw order, so
    a vote tie goes to the first expert drawn (a random tie-break), not to the strongest."""
    return list(random_table([q.id for q in questions], names, k, seed))


def random_table(ids: list[str], names: list[str], k: int, seed: int) -> RouteTable:
    """``random_routes`` as a ``RouteTable``."""
    pool = range(len(names))  # ``sample`` draws positions: the same draw as from the names
    drawn = np.array([random.Random(f"{seed}:{qid}").sample(pool, k) for qid in ids],
                     np.int16).reshape(len(ids), k)
    weights = np.tile(np.array([(k - i) / k for i in range(k)]), (len(ids), 1))
    return RouteTable.from_arrays(ids, names, drawn, weights, reason=f"random {k} (seed {seed})")


def split_validation(questions: list[Question], fraction: float,
                     seed: int) -> tuple[list[Question], list[Question]]:
    """(validation, test): a seeded shuffle of the question ids, the first ``fraction`` held
    out for validation. Both keep the file's order."""
    ids = sorted(q.id for q in questions)
    random.Random(seed).shuffle(ids)
    n_val = int(round(len(ids) * fraction))
    n_val = min(max(n_val, 1), len(ids) - 1)
    val_ids = set(ids[:n_val])
    return ([q for q in questions if q.id in val_ids],
            [q for q in questions if q.id not in val_ids])


def _question_key(q: Question) -> tuple[str, tuple[str, ...]]:
    """A question's text and choices, case and white space aside."""
    def fold(t: str) -> str:
        return " ".join(t.casefold().split())

    return fold(q.question), tuple(fold(c) for c in q.choices or ())


def overlap(validation: list[Question], test: list[Question]) -> dict:
    """The test questions also in ``validation``, by id or by text (and choices): counts and
    the test ids, in the test's order."""
    val_ids = {q.id for q in validation}
    val_text = {_question_key(q) for q in validation}
    same_id = [q.id for q in test if q.id in val_ids]
    same_text = [q.id for q in test if _question_key(q) in val_text]
    both = set(same_id) | set(same_text)
    return {"questions": len(both), "same_id": len(same_id), "same_text": len(same_text),
            "ids": [q.id for q in test if q.id in both]}
