"""An evaluation's verdict: every strategy scored on every question set, compared with
best-single question by question (``coe.apps.eval.compare``), and the strategy to deploy
recommended from the validation comparisons alone (``coe.apps.eval.recommend``), with its pool
yaml."""

from __future__ import annotations

from coe.apps.eval.compare import compare, holm
from coe.apps.eval.recommend import recommend, recommended_pool
from coe.apps.eval.result import QuestionSet
from coe.apps.eval.scoring import Accuracy, score_strategy


def score(job, qs: QuestionSet) -> None:
    qs.scores = []
    for s in job.specs:
        if s.name not in qs.routes_of:
            continue
        score = score_strategy(s.name, s.description, qs.outcomes[s.name], job.config,
                               qs.route_seconds.get(s.name, 0.0))
        if s.kind in ("single", "best-single"):
            score.recruit_oracle = Accuracy()  # same as the accuracy: not informative
        qs.scores.append(score)


def reference(job) -> str | None:
    return next((s.name for s in job.specs
                 if s.kind == "best-single" and job.val is not None
                 and s.name in job.val.outcomes), None)


def compare_all(job) -> None:
    """Every strategy against best-single, question by question, on each question set;
    Holm's correction across the strategies of a set (``coe.apps.eval.compare``)."""
    ref = reference(job)
    if ref is None:
        return
    for qs in job.sets:
        base = qs.outcomes[ref].correct
        job.comparisons[qs.name] = holm({
            name: compare(out.correct == 1, out.correct >= 0, base == 1, base >= 0,
                          seed=job.opts.seed)
            for name, out in qs.outcomes.items() if name != ref})


def recommend_one(job) -> None:
    """The strategy to deploy, from the validation comparisons alone, and its pool yaml."""
    ref = reference(job)
    if ref is None:
        job.no_recommendation = ("no recommendation: it needs best-single and validation "
                                  "questions (--strategies without best-single, or no "
                                  "--validation / --val-fraction 0)")
        return
    specs = [s for s in job.specs if s.name in job.val.outcomes]
    # a strategy whose validation figures may be in-sample is not recommended on them
    rec = recommend([s for s in specs if s.name not in job.in_sample],
                    {s.name: s for s in job.val.scores}, job.comparisons["validation"], ref)
    rec.not_recommendable.update(
        {n: f"its validation figures may be in-sample: {why}" for n, why in job.in_sample.items()
         if n in job.val.outcomes})
    spec = next(s for s in specs if s.name == rec.strategy)
    one = [job.best] if spec.kind == "best-single" else [spec.expert] if spec.expert else None
    job.recommendation = rec
    job.recommended_pool = recommended_pool(
        job.config, spec, k=job.router_k.get(spec.name), experts=one,
        strength=job.strength, aggregator_expert=job.opts.aggregator_expert)
