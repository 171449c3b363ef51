"""Which strategy to deploy, decided on the validation questions only, and its pool yaml.

The recommendation is the **cheapest** strategy (average generations per validation question:
its experts' and its aggregator's) whose accuracy on the validation questions is
significantly higher than best-single's (paired comparison, McNemar's exact test after
Holm's correction: ``coe.apps.eval.compare``); ties go to the higher validation accuracy. When no
strategy is, it is best-single itself: the best model alone is then the honest choice. The
test questions play no part: their figures are reported beside the choice, as a check.

Not recommendable, whatever their figures: the oracle (it needs the gold answer) and random-k
(no router draws experts at random: it is a baseline).

``recommended_pool`` writes the strategy as a pool yaml (a dict) that ``coe run`` runs as the
evaluation ran it: the router section the evaluation routed with (the pool's router fields,
its kind and k, and any router field the strategy carries), the aggregator, the category map
as the evaluation used it, the vote tie-break strengths the evaluation used, and every file
path made absolute so the yaml works from wherever it is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from coe.apps.eval.compare import Comparison
from coe.apps.eval.scoring import StrategyScore
from coe.apps.eval.strategies import StrategySpec
from coe.core.config import AggregatorConfig, PoolConfig, RouterConfig
from coe.io.model_ref import PREFIX

#: strategy kinds that are never recommended, and why
NOT_RECOMMENDABLE = {
    "oracle": "not deployable: it is right when any expert is, which takes the gold answer",
    "random": "a baseline: no router of the yaml draws experts at random",
}

#: the strategy fields every spec has; any other (a cascade's budget) is a router or
#: aggregator field, mapped by name
_SPEC_FIELDS = {"name", "kind", "description", "router", "aggregator", "k", "expert"}


def generations_per_question(score: StrategyScore) -> float:
    """Expert and aggregator generations the strategy asks for, per question (failed ones
    included: they were asked for)."""
    return (score.generations + score.failed) / score.questions if score.questions else 0.0


@dataclass
class Recommendation:
    strategy: str
    reason: str
    generations: float  # per validation question
    #: significantly better than best-single on validation, cheapest first (the first is it)
    candidates: list[str] = field(default_factory=list)
    not_recommendable: dict[str, str] = field(default_factory=dict)  # strategy -> why

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def recommend(specs: list[StrategySpec], val_scores: dict[str, StrategyScore],
              val_comparisons: dict[str, Comparison], reference: str) -> Recommendation:
    """The recommendation among ``specs`` (those scored), from validation figures only."""
    excluded = {s.name: NOT_RECOMMENDABLE[s.kind] for s in specs if s.kind in NOT_RECOMMENDABLE}
    order = {s.name: i for i, s in enumerate(specs)}
    better = [s.name for s in specs
              if s.name != reference and s.name not in excluded and s.name in val_scores
              and (c := val_comparisons.get(s.name)) is not None and c.verdict == "better"]
    better.sort(key=lambda n: (generations_per_question(val_scores[n]),
                               -(val_scores[n].overall.value or 0.0), order[n]))
    if not better:
        return Recommendation(
            reference, "no strategy is significantly more accurate than best-single on the "
            "validation questions (McNemar, Holm-corrected): the best single model is the "
            "honest choice", generations_per_question(val_scores[reference]), [], excluded)
    pick, c = better[0], val_comparisons[better[0]]
    g = generations_per_question(val_scores[pick])
    reason = (f"the cheapest strategy ({g:.2f} generations/question) significantly more "
              f"accurate than best-single on the validation questions ({100 * c.diff:+.1f} "
              f"points, [{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}], Holm p = {c.p_holm:.2g})")
    if len(better) > 1:
        reason += f"; also significantly better, at more cost: {', '.join(better[1:])}"
    return Recommendation(pick, reason, g, better, excluded)


def _absolute(config: PoolConfig, value: str) -> str:
    return str(config.resolve_path(value).resolve())


def _is_relative(value: str) -> bool:
    return not value.startswith(PREFIX) and not Path(value).expanduser().is_absolute()


def recommended_pool(config: PoolConfig, spec: StrategySpec, *, k: int | None,
                     experts: list[str] | None = None, strength: dict[str, float] | None = None,
                     aggregator_expert: str | None = None) -> dict:
    """The pool yaml (as a dict) that runs ``spec`` as the evaluation did.

    ``k``: the number of recruits the evaluation routed with (None: the router's own);
    ``experts``: the only experts the strategy runs (a single expert: the pool is reduced to
    it, with no category map, and routed with ``all``); ``strength``: the vote tie-break strengths the evaluation
    used (written for the experts the yaml gives none); ``aggregator_expert``: the llm
    aggregator expert the evaluation was told to use."""
    raw = config.model_dump(mode="json", exclude_unset=True)
    keep = set(experts) if experts else {e.name for e in config.experts}
    pool = [e for e in raw["experts"] if e["name"] in keep]
    for e in pool:
        model = e["model"]
        if _is_relative(model) and config.resolve_path(model).exists():  # not an API model id
            e["model"] = _absolute(config, model)
        if e.get("strength") is None and strength and e["name"] in strength:
            e["strength"] = strength[e["name"]]
    # the category map as the evaluation read it (strengths added above would reorder the
    # experts that list a category themselves); a one-expert pool routes by none
    categories = {}
    for c in config.category_names() if not experts else ():
        desc = config.categories[c].description if c in config.categories else ""
        categories[c] = {**({"description": desc} if desc else {}),
                         "experts": config.category_experts(c)}
    extra = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
             if f.name not in _SPEC_FIELDS and getattr(spec, f.name) is not None}
    if experts:
        router = {"kind": "all"}
    else:
        router = {**raw.get("router", {}), "kind": spec.router}
        router.pop("k", None)
        if k is not None:
            router["k"] = k
        router.update({n: v for n, v in extra.items() if n in RouterConfig.model_fields})
        for f in ("model_file", "profiles"):
            if router.get(f) and _is_relative(router[f]):
                router[f] = _absolute(config, router[f])
    if router.get("keyword_expert") not in (None, *keep):
        router.pop("keyword_expert")
    aggregator = {**raw.get("aggregator", {}), "kind": spec.aggregator or "vote"}
    if aggregator_expert:
        aggregator["expert"] = aggregator_expert
    aggregator.update({n: v for n, v in extra.items() if n in AggregatorConfig.model_fields})
    if aggregator.get("expert") not in (None, *keep):
        aggregator.pop("expert")
    if aggregator["kind"] != "llm":  # the yaml's llm mode is not the recommended kind's
        aggregator.pop("mode", None)
    if aggregator["kind"] not in ("vote", "llm", "learned"):
        aggregator.pop("threshold", None)
    if aggregator.get("profiles") and _is_relative(aggregator["profiles"]):
        aggregator["profiles"] = _absolute(config, aggregator["profiles"])
    out = {"experts": pool, **({"categories": categories} if categories else {}),
           "router": router, "aggregator": aggregator}
    rest = {n: v for n, v in raw.items() if n not in ("experts", "categories", "router",
                                                       "aggregator")}
    emb = rest.get("embeddings", {}).get("model")
    if emb is not None:
        source = emb.partition(":")[2] if emb.startswith("static:") else emb
        if source and source != "static" and _is_relative(source):
            rest["embeddings"]["model"] = emb[:len(emb) - len(source)] + _absolute(config, source)
    if rest.get("cache") and _is_relative(rest["cache"]):
        rest["cache"] = _absolute(config, rest["cache"])
    return {**out, **rest}
