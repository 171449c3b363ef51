"""The strategies an evaluation compares, and how each one recruits experts per question.

Names (``--strategies`` takes a comma-separated list of names or shell patterns):

- ``single:<expert>``  every expert alone;
- ``best-single``      the expert most accurate on the *validation* questions, never the test;
- ``<router>+<agg>``   each registered router (``all``, ``category``, ``skill``, plugins) with
                       each registered aggregator but ``single`` (``vote``, ``llm``,
                       plugins); ``all+vote`` is the all-experts vote;
- ``<router>@1``       the router's first expert only (CoE's one-expert route);
- ``knn+learned~<b>`` a cascade (``coe.routing.cascade``): the knn router's recruits asked in rounds
                       until the answer selector is confident, at most ``b`` experts for any
                       question (``--budgets``, and the yaml's ``router.budget``);
- ``knn+learned~mean<b>`` the same with ``b`` experts per question *on average* on the
                       validation record (``--budgets mean:<b>``, ``router.budget_mode: mean``);
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
from coe.core.wording import counted
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
    budget: float | None = None  # a cascade's experts per question (router.budget)
    budget_mode: str | None = None  # cap | mean (router.budget_mode)


def parse_budget(value) -> tuple[float, str]:
    """A cascade budget as ``--budgets`` and ``EvalOptions.budgets`` give it: a number (a
    cap: at most that many experts for any question), ``"mean:B"`` (B on average), or a
    ``(B, mode)`` pair; a ``ValueError`` otherwise."""
    if isinstance(value, tuple):
        number, mode = value
    elif isinstance(value, str):
        mode, _, number = value.strip().rpartition(":")
        mode = mode.strip() or "cap"
    else:
        number, mode = value, "cap"
    if mode not in ("cap", "mean"):
        raise ValueError(f"{value!r}: a budget is a number (a cap) or mean:NUMBER")
    number = float(number)
    if not number >= 1:
        raise ValueError(f"{value!r}: a cascade asks at least 1 expert per question")
    return number, mode


def all_specs(config: PoolConfig, random_k: int = 3,
              budgets: list | tuple = ()) -> list[StrategySpec]:
    """Every strategy the pool could support, before availability checks; ``budgets``: the
    cascades to try (``parse_budget``'s forms; the yaml's ``router.budget`` is added when its
    router is knn)."""
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
    budgets = [parse_budget(b) for b in budgets]
    if config.router.kind == "knn" and config.router.budget is not None:
        budgets.append((config.router.budget, config.router.budget_mode))
    for b, mode in sorted(set(budgets), key=lambda bm: (bm[1] == "mean", bm[0])):
        bound = (f"at most {b:g} experts for any question" if mode == "cap" else
                 f"at most {b:g} experts/question on average on validation")
        specs.append(StrategySpec(
            f"knn+learned~{'mean' if mode == 'mean' else ''}{b:g}", "router",
            f"knn router's recruits asked in rounds until the answer selector is confident: "
            f"{bound}", router="knn", aggregator="learned", budget=b, budget_mode=mode))
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
    the test ids, in the test's order.

    A data set may hold one question twice under two ids (MMLU-Pro repeats 159 of its
    12,032): a split then puts some such pairs on both sides. When the data repeats texts
    within a side too, a test question whose text a validation question repeats *under
    another id* is counted as a ``duplicate`` of the data, not as overlap of the split;
    without such repeats (a validation file copied from the test with new ids) it is
    overlap."""
    val_ids = {q.id for q in validation}
    val_text = {_question_key(q) for q in validation}
    same_id = [q.id for q in test if q.id in val_ids]
    same_text = [q.id for q in test if _question_key(q) in val_text]
    repeats = sum(len(side) - len({_question_key(q) for q in side}) for side in (validation, test))
    other_id = [i for i in same_text if i not in val_ids]
    duplicates = other_id if repeats else []
    both = (set(same_id) | set(same_text)) - set(duplicates)
    return {"questions": len(both), "same_id": len(same_id), "same_text": len(same_text),
            "ids": [q.id for q in test if q.id in both], "duplicates": len(duplicates),
            "repeated_within": repeats}


def overlap_notes(o: dict, val_source: str, n_test: int) -> list[str]:
    """What ``overlap`` found, as the report's lines: the data's duplicates (a note), the
    split's overlap (a warning, last so that it is inserted first)."""
    notes = []
    if o["duplicates"]:
        n = o["duplicates"]
        notes.append(
            f"note: {counted(n, 'test question')} {'repeats' if n == 1 else 'repeat'} the text "
            f"and choices of a validation question under another id: duplicates in the data, "
            f"which repeats {counted(o['repeated_within'], 'question')} within the validation "
            f"and test sets themselves too (MMLU-Pro does); scored as questions of their own, "
            f"not counted as overlap")
    if o["questions"]:
        notes.append(f"warning: the validation questions ({val_source}) overlap the test set: "
                     f"{o['questions']} of the {n_test} test questions (same id: {o['same_id']}, "
                     f"same text: {o['same_text']}); best-single and the recommendation are "
                     "chosen partly on the test questions")
    return notes
