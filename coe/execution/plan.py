"""A plan: the generation requests of one executor call grouped by model weights, with
duplicates and cache hits found; and the counts (``RunStats``) an executor call returns."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from coe.core.types import Generation, GenRequest


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

    def rows(self) -> list[str]:
        """One line per group: its model, experts, jobs and cached jobs (under
        ``PLAN_HEADER``)."""
        return [plan_row(g.label, g.experts, len(g.indices), g.cached) for g in self.groups]

    def summary(self) -> str:
        return plan_summary(len(self.requests), len(self.same_as), len(self.hits), self.loads,
                            self.naive_loads)

    def describe(self) -> str:
        return "\n".join([PLAN_HEADER, *self.rows(), self.summary()])


PLAN_HEADER = f"{'model':<44} {'experts':<34} {'jobs':>6} {'cached':>7}"


def plan_row(label: str, experts: list[str], jobs: int, cached: int) -> str:
    return f"{label[:44]:<44} {','.join(experts)[:34]:<34} {jobs:>6} {cached:>7}"


def plan_summary(requests: int, duplicates: int, cached: int, loads: int, naive: int) -> str:
    """The last line of ``Plan.describe``, also for the plans of several stages together."""
    return (f"{requests} generation requests ({duplicates} duplicates), {cached} cached; "
            f"{loads} model loads (naive per-question order: {naive})")


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

    def add(self, other: "RunStats") -> "RunStats":
        """Add ``other``'s counts to these (the first error per expert is kept)."""
        for f in fields(self):
            if f.name == "failures":
                for name, msg in other.failures.items():
                    self.failures.setdefault(name, msg)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class Execution:
    """What one ``Executor.run`` call returns."""

    generations: list[Generation]
    stats: RunStats

