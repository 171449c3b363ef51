"""The load-once executor: every generation any stage needs goes through here.

``plan`` groups the requests by *model weights* (experts that share a load key, such as two
personas of one GGUF, share one group), drops duplicates and looks up the response cache.
``run`` then loads each model once, hands its backend all of its uncached prompts in one call,
stores every generation in the cache as soon as it finishes, and releases the model before
loading the next. The last model stays loaded between calls (the next call starts with it), so
an aggregation stage on an expert's weights does not reload them. ``RunStats`` counts loads,
generations, cache hits and time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from coe.cache import ResponseCache, cache_key
from coe.config import PoolConfig
from coe.errors import CoeError, ExpertError
from coe.experts import Backend, Generation, GenRequest, create_backend


@dataclass
class PlanGroup:
    key: tuple
    label: str
    experts: list[str]
    indices: list[int]  # unique requests of this group (indices into Plan.requests)
    cached: int = 0


@dataclass
class Plan:
    requests: list[GenRequest]
    groups: list[PlanGroup]
    cache_keys: list[str]
    hits: dict[int, Generation]  # request index -> cached generation
    same_as: dict[int, int]  # duplicate request index -> first index

    @property
    def naive_loads(self) -> int:
        """Loads a per-question order would make: one for every (question, expert) job."""
        return len(self.requests)

    @property
    def loads(self) -> int:
        return sum(1 for g in self.groups if len(g.indices) > g.cached)

    def describe(self) -> str:
        lines = [f"{'model':<44} {'experts':<34} {'jobs':>6} {'cached':>7}"]
        for g in self.groups:
            lines.append(f"{g.label[:44]:<44} {','.join(g.experts)[:34]:<34} "
                         f"{len(g.indices):>6} {g.cached:>7}")
        dup = len(self.same_as)
        lines.append(f"{len(self.requests)} generation requests ({dup} duplicates), "
                     f"{len(self.hits)} cached; {self.loads} model loads "
                     f"(naive per-question order: {self.naive_loads})")
        return "\n".join(lines)


@dataclass
class RunStats:
    loads: int = 0
    naive_loads: int = 0
    requests: int = 0
    generations: int = 0
    cache_hits: int = 0
    failed_generations: int = 0
    generation_seconds: float = 0.0
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # expert -> first error


class Executor:
    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False):
        self.config = config
        self.cache = cache
        self.progress = progress
        self.fail_fast = fail_fast
        self.stats = RunStats()
        self._backends: dict[tuple, Backend] = {}
        self._resident: tuple | None = None

    # -- planning -------------------------------------------------------------------------
    def backend_for(self, expert_name: str) -> Backend:
        cfg = self.config.expert(expert_name)
        key = cfg.load_key()
        if key not in self._backends:
            self._backends[key] = create_backend(cfg, self.config.base_dir)
        return self._backends[key]

    def plan(self, requests: list[GenRequest], last: str | None = None) -> Plan:
        """Group ``requests`` by weights. The resident model's group runs first; the group of
        expert ``last`` (the next stage's model, e.g. the llm aggregator) runs last, so it is
        still loaded when that stage starts."""
        groups: dict[tuple, PlanGroup] = {}
        keys: list[str] = []
        first: dict[str, int] = {}
        same_as: dict[int, int] = {}
        # Per plan, each expert's backend and weights fingerprint are looked up once (hashing
        # a model file per request made planning 48k replayed generations take 90 s).
        per_expert: dict[str, tuple] = {}
        for i, r in enumerate(requests):
            hit = per_expert.get(r.expert)
            if hit is None:
                backend = self.backend_for(r.expert)
                hit = per_expert[r.expert] = (backend, backend.fingerprint(),
                                              self.config.expert(r.expert).load_key())
            backend, fingerprint, lk = hit
            key = cache_key(fingerprint, r, backend.keyed_by_question)
            keys.append(key)
            g = groups.get(lk)
            if g is None:
                g = groups[lk] = PlanGroup(key=lk, label=backend.label, experts=[], indices=[])
            if r.expert not in g.experts:
                g.experts.append(r.expert)
            if key in first:
                same_as[i] = first[key]
                continue
            first[key] = i
            g.indices.append(i)
        hits: dict[int, Generation] = {}
        if self.cache is not None:
            cacheable = [i for g in groups.values() if self._backends[g.key].cacheable
                         for i in g.indices]
            found = self.cache.get_many([keys[i] for i in cacheable])
            for i in cacheable:
                if keys[i] in found:
                    hits[i] = found[keys[i]].model_copy(update={"cached": True})
        for g in groups.values():
            g.cached = sum(1 for i in g.indices if i in hits)
        last_key = self.config.expert(last).load_key() if last else None
        order = sorted(groups.values(),  # stable: otherwise first-come order
                       key=lambda g: (g.key == last_key, g.key != self._resident))
        return Plan(requests, order, keys, hits, same_as)

    # -- running --------------------------------------------------------------------------
    def _switch_to(self, group: PlanGroup) -> Backend:
        backend = self._backends[group.key]
        if self._resident == group.key:
            return backend
        self.release()
        t0 = time.perf_counter()
        backend.load()
        self.stats.load_seconds += time.perf_counter() - t0
        self.stats.loads += 1
        self._resident = group.key
        return backend

    def release(self) -> None:
        """Unload the resident model, if any."""
        if self._resident is not None:
            self._backends[self._resident].unload()
            self._resident = None

    def _fail(self, plan: Plan, results: list, todo: list[int], group: PlanGroup, msg: str):
        for i in todo:
            if results[i] is None:
                results[i] = Generation(error=msg)
                self.stats.failed_generations += 1
        for name in group.experts:
            self.stats.failures.setdefault(name, msg)
        if self.fail_fast:
            raise ExpertError(group.experts[0], msg)

    def run(self, requests: list[GenRequest], plan: Plan | None = None) -> list[Generation]:
        """Generations for ``requests``, in order. Never raises for a failing expert unless
        ``fail_fast``: its generations carry ``error`` and ``stats.failures`` names it."""
        plan = plan or self.plan(requests)
        self.stats.requests += len(requests)
        self.stats.naive_loads += plan.naive_loads
        results: list[Generation | None] = [None] * len(requests)
        for i, gen in plan.hits.items():
            results[i] = gen
            self.stats.cache_hits += 1
        for group in plan.groups:
            todo = [i for i in group.indices if results[i] is None]
            if not todo:
                continue
            try:
                backend = self._switch_to(group)
            except CoeError as e:
                self._fail(plan, results, todo, group, f"load failed: {e}")
                continue
            bar = tqdm(total=len(todo), desc=group.label[:40], unit="gen",
                       disable=not self.progress, leave=False)

            def on_result(j: int, gen: Generation, todo=todo, backend=backend, bar=bar) -> None:
                i = todo[j]
                results[i] = gen
                if gen.error is None:
                    self.stats.generations += 1
                    self.stats.generation_seconds += gen.seconds
                    self.stats.prompt_tokens += gen.prompt_tokens
                    self.stats.completion_tokens += gen.completion_tokens
                    if self.cache is not None and backend.cacheable:
                        self.cache.put(plan.cache_keys[i], gen)
                else:
                    self.stats.failed_generations += 1
                    self.stats.failures.setdefault(requests[i].expert, gen.error)
                bar.update(1)

            try:
                backend.generate([requests[i] for i in todo], on_result)
            except Exception as e:  # the model broke mid-batch: keep what finished
                done = sum(1 for i in todo if results[i] is not None)
                try:
                    self.release()
                except Exception:
                    self._resident = None
                self._fail(plan, results, todo, group,
                           f"crashed after {done}/{len(todo)} generations: {type(e).__name__}: {e}")
            finally:
                bar.close()
            if self.fail_fast:
                for i in todo:
                    if results[i] is not None and results[i].error:
                        raise ExpertError(requests[i].expert, results[i].error)
        for i, j in plan.same_as.items():
            results[i] = results[j]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.release()
