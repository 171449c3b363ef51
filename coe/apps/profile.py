"""Building model profiles (``coe profile``): every expert of the pool answers validation
questions with gold answers through an orchestrator (one load per model, the response cache
first), each question's skills are inferred, and every aggregator candidate aggregates the
experts' responses — all candidates' generations in one executor call. The result goes into
``coe.learned.profiles.Profiles``, the data the skill router reads.

This sits above the orchestrator; the profiles themselves sit below the routers.
"""

from __future__ import annotations

from coe.aggregation.base import aggregate_together
from coe.aggregation.llm import LLMAggregator
from coe.apps.api import Orchestrator
from coe.core.errors import ConfigError
from coe.learned.embeddings import shared_embedder, static_tag
from coe.learned.neighbours import Neighbourhood, ValidationRecord
from coe.learned.profiles import AggregatorProfile, Profiles, add_expert_results
from coe.learned.selector import fit_selector
from coe.routing.all import AllRouter
from coe.routing.skills import build_skill_inferrer
from coe.text.answers import is_correct


def build_profiles(config, questions, existing: Profiles | None = None, skills: str | None = None,
                   aggregators: list[str] | None = None, cache=True, progress: bool = False,
                   log=None) -> Profiles:
    """Profile every expert of ``config`` on ``questions`` (which need gold answers).

    ``aggregators``: experts to measure as aggregators (default: every expert that is not a
    replay, since a replay can only repeat its recorded answer)."""
    log = log or (lambda msg: None)
    graded = [q for q in questions if q.answer is not None]
    if not graded:
        raise ConfigError("profiling needs questions with gold answers")
    if aggregators is None:
        aggregators = [e.name for e in config.experts if e.backend != "replay"]
    candidates = {name: LLMAggregator(config, expert=name) for name in aggregators}
    # every expert on every question, whatever k the yaml sets for routing
    with Orchestrator(config, router=AllRouter(config), aggregator="vote", cache=cache,
                      progress=progress) as orch, orch.executor.session() as stats:
        inferrer = build_skill_inferrer(config, orch.executor, skills)
        prof = existing or Profiles(skill_source=inferrer.source)
        if prof.skill_source != inferrer.source:
            raise ConfigError(f"profiles were built with skills from {prof.skill_source}, "
                              f"not {inferrer.source}")
        done = set(prof.questions)
        todo = [q for q in graded if q.id not in done]
        log(f"{len(todo)} new questions to profile ({len(graded) - len(todo)} already in the profiles)")
        if not todo:
            return prof
        run = orch.run(todo)
        routes = [r.route for r in run.results]
        responses = [r.responses for r in run.results]
        add_expert_results(prof, todo, inferrer.infer(todo), responses)
        _profile_aggregators(prof, orch, candidates, todo, routes, responses)
        prof.questions.extend(q.id for q in todo)
        record = _record(config, todo, responses, prof if existing is not None else None)
        prof.attach_record(record)
        prof.selector = fit_selector(record, Neighbourhood(record, config,
                                                           config.router.neighbours))
        log(f"validation record: {len(record)} questions; answer selector "
            + ("fitted" if prof.selector else "not fitted (no right or no wrong answer to learn from)"))
    log(f"profiled {len(todo)} questions: {stats.generations} generations, "
        f"{stats.cache_hits} cached, {stats.loads} model loads")
    return prof


def _record(config, questions, responses, existing: Profiles | None) -> ValidationRecord:
    """The validation run of ``questions``, after the existing profiles' record if any."""
    ref, base = config.embeddings.model, str(config.base_dir)
    vecs = shared_embedder(ref, config.embeddings.batch_size, base).encode(
        [q.question for q in questions])
    new = ValidationRecord.from_run(questions, responses, [e.name for e in config.experts],
                                    vecs, ref, static_tag(ref, base))
    if existing is None or existing.record is None:
        return new
    return existing.validation_record().extend(new)


def _profile_aggregators(prof: Profiles, orch: Orchestrator, candidates: dict[str, LLMAggregator],
                         questions, routes, responses) -> None:
    """How often each candidate, given the experts' responses, writes the gold answer."""
    jobs = {name: (agg, routes, responses) for name, agg in candidates.items()}
    finals_of = aggregate_together(questions, jobs,
                                   lambda requests: orch.executor.run(requests).generations)
    for name, finals in finals_of.items():
        tally = prof.aggregators.setdefault(name, AggregatorProfile())
        for q, f in zip(questions, finals):
            if f.response is not None and f.response.error is None:
                tally.total += 1
                tally.correct += int(bool(is_correct(f.response.answer, q)))
