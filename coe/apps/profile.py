"""Building model profiles (``coe profile``): every expert of the pool answers validation
questions with gold answers through the pipeline (``coe.pipeline.flow``: one load per model,
the response cache first), each question's skills are inferred, and every aggregator candidate
aggregates the experts' responses (the pipeline's aggregate stage: all candidates'
generations in one executor call). The result goes into ``coe.learned.profiles.Profiles``,
the data the skill and knn routers and the learned aggregator read.
"""

from __future__ import annotations

from coe.aggregation.llm import LLMAggregator
from coe.aggregation.vote import VoteAggregator
from coe.core.errors import ConfigError
from coe.core.registry import BACKENDS
from coe.core.wording import counted
from coe.execution import build_executor
from coe.io.cache import open_cache
from coe.learned.embeddings import shared_embedder, static_tag
from coe.learned.neighbours import Neighbourhood, ValidationRecord
from coe.learned.profiles import AggregatorProfile, Profiles, add_expert_results
from coe.learned.selector import fit_selector
from coe.pipeline import flow
from coe.pipeline.aggregate import Job, aggregate
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
        aggregators = [e.name for e in config.experts
                       if not BACKENDS.get(e.backend).capabilities_for(e).replay_only]
    candidates = {name: LLMAggregator(config, expert=name) for name in aggregators}
    store = open_cache(config, cache)
    executor = build_executor(config, cache=store, progress=progress)
    try:
        return _profile(config, graded, existing, skills, candidates, executor, log)
    finally:
        executor.close()
        if store is not None:
            store.close()


def _profile(config, graded, existing, skills, candidates, executor, log) -> Profiles:
    # every expert on every question, whatever k the yaml sets for routing
    everyone = flow.Composition("profile", AllRouter(config), VoteAggregator())
    with executor.session() as stats:
        inferrer = build_skill_inferrer(config, executor, skills)
        prof = existing or Profiles(skill_source=inferrer.source)
        if prof.skill_source != inferrer.source:
            raise ConfigError(f"profiles were built with skills from {prof.skill_source}, "
                              f"not {inferrer.source}")
        seen = set(prof.questions)
        todo = [q for q in graded if q.id not in seen]
        log(f"{counted(len(todo), 'new question')} to profile "
            f"({len(graded) - len(todo):,} already in the profiles)")
        if not todo:
            return prof
        done = flow.answer(executor, config, [flow.Part(everyone, todo)])
        responses = [r.responses for r in done.results[0]]
        add_expert_results(prof, todo, inferrer.infer(todo), responses)
        _profile_aggregators(prof, executor, candidates, todo, done)
        prof.questions.extend(q.id for q in todo)
        record = _record(config, todo, responses, prof if existing is not None else None)
        prof.attach_record(record)
        prof.selector = fit_selector(record, Neighbourhood(record, config,
                                                           config.router.neighbours))
        log(f"validation record: {counted(len(record), 'question')}; answer selector "
            + ("fitted" if prof.selector else "not fitted (no right or no wrong answer to learn from)"))
    log(f"profiled {counted(len(todo), 'question')}: {counted(stats.generations, 'generation')}, "
        f"{stats.cache_hits:,} cached, {counted(stats.loads, 'model load')}")
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


def _profile_aggregators(prof: Profiles, executor, candidates: dict[str, LLMAggregator],
                         questions, done: flow.Answered) -> None:
    """How often each candidate, given the experts' responses, writes the gold answer: every
    candidate's generations in one executor call (the pipeline's aggregate stage)."""
    names = list(candidates)
    jobs = [Job(candidates[n], done.routes[0], done.table, done.rows[0]) for n in names]
    finals: dict[int, list] = {}

    def sink(k: int, start: int, out: list) -> None:
        finals.setdefault(k, []).extend(out)

    aggregate(jobs, sink, lambda requests, token: executor.run(requests).generations)
    for k, name in enumerate(names):
        tally = prof.aggregators.setdefault(name, AggregatorProfile())
        for q, f in zip(questions, finals.get(k, [])):
            if f.response is not None and f.response.error is None:
                tally.total += 1
                tally.correct += int(bool(is_correct(f.response.answer, q)))
