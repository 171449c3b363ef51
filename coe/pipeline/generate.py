"""The generate stage: the experts' generations of many requests, made once, into a
``ResponseTable``.

The caller names *cells*: per question set (a ``ResponseTable``), which (request, expert)
pairs are needed (a boolean mask, requests x experts) and how each request's experts are asked
(``Prompts``: as a recruit of a composition, or as a pass-through). Every cell becomes a
``GenRequest``; the executor plans them (grouped by weights, duplicates and cache hits found)
and runs them; each generation goes into its cell as its run returns.

Two ways to hand them over:

- ``whole`` (a run, a served batch, profiling): one plan of every cell, shown to ``on_plan``
  before any model loads, then one executor call;
- in stages (an evaluation): the executor's ``stages`` (the local executor: one model at a
  time, which runs one after another anyway, so no load is added), and where it keeps a model
  loaded from one run to the next, in runs of at most ``CHUNK`` requests: at most one chunk
  of requests and generations is held at a time, however many questions.

A cell whose expert cannot honour what its request asks (tools to a backend without them, a
JSON schema to a replay, a tool turn to a completion-format model) is not sent: its generation
fails with one line saying what and who, and the caller decides what that means.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from coe.backends import Capabilities
from coe.core.config import ExpertConfig, PoolConfig
from coe.core.request import Request
from coe.core.types import Generation, GenRequest
from coe.execution import PLAN_HEADER, Executor, Plan, plan_row, plan_summary
from coe.pipeline.responses import ResponseTable
from coe.text.prompts import Unrenderable, build_request, proxy_request

#: expert requests handed to the executor in one run at most, when it keeps a model loaded
#: from one run to the next (the local executor): one model's share of 100,000 questions is
#: given in a few runs, so at most this many requests and generations are held at a time
CHUNK = 16384

PromptKind = Literal["compose", "proxy"]
ANY = Capabilities()  # a backend that is not a replay


def asks_more(q: Request) -> bool:
    """Whether the request asks more than text: tools, a JSON format, logprobs, echo."""
    return bool(q.tools or (q.response_format is not None and q.response_format.wants_json)
                or (q.sampling is not None and (q.sampling.wants_logprobs is not None
                                                or q.sampling.echo)))


def prompt(kind: PromptKind, q: Request, cfg: ExpertConfig, can: Capabilities,
           sample: int = 0) -> GenRequest:
    """The request of expert ``cfg`` for ``q``: as a recruit (``compose``) or a pass-through
    (``proxy``). A replay answers by question id: no prompt is built for it."""
    if can.replay_only:
        return GenRequest(expert=cfg.name, question_id=q.id, sampling=cfg.sampling,
                          sample=sample)
    if kind == "proxy":
        return proxy_request(cfg, q, sample=sample)
    return build_request(cfg, q, sample=sample)


def checked(kind: PromptKind, q: Request, cfg: ExpertConfig, can: Capabilities,
            sample: int = 0) -> tuple[GenRequest | None, str | None, str | None]:
    """(request, lack, why): expert ``cfg``'s request for ``q``, or None with what it lacks
    ("tools", "response_format json_schema", "logprobs", "echo", "chat messages", or
    "messages": a conversation its format cannot hold) and one line naming the expert."""
    try:
        r = prompt(kind, q, cfg, can, sample)
    except Unrenderable as e:
        return None, "messages", (f"expert {cfg.name!r} ({cfg.prompt_format} format) cannot "
                                  f"take this request: {e}")
    # a replay's request has no prompt to check: what the request asks is checked on the
    # request another backend would get
    lack = can.lacks(prompt(kind, q, cfg, ANY) if can.replay_only and asks_more(q) else r)
    if lack is None:
        return r, None, None
    return None, lack, f"expert {cfg.name!r} (backend {cfg.backend}) cannot honour {lack}"


@dataclass
class Cells:
    """The generations one question set needs: ``mask`` (its table's requests x experts) and
    how its requests' experts are asked (``kind``; ``kinds``: per request, overriding it)."""

    table: ResponseTable
    mask: np.ndarray
    kind: PromptKind = "compose"
    kinds: list[PromptKind] | None = None
    samples: list[int] | None = None  # per request: which of its n samples it is


@dataclass
class Phase:
    """One stage of a job's generations (an evaluation's ``validation``, ``experts``,
    ``aggregation``...), with what the executor calls made of it."""

    name: str
    requests: int = 0
    unique: int = 0
    cached: int = 0
    generations: int = 0
    replayed: int = 0  # of ``generations``: read from replay records, not generated
    failed: int = 0
    refused: int = 0  # not sent: the expert cannot honour what the request asks
    loads: int = 0
    seconds: float = 0.0
    plans: list[Plan] = field(default_factory=list)  # with ``whole``: the one plan

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "plans"}


#: ``on_token(cells index, request row, expert column, piece)``
CellToken = Callable[[int, int, int, str], None]


class Generator:
    """The generate stage over one executor and pool (see the module doc)."""

    def __init__(self, executor: Executor, config: PoolConfig,
                 log: Callable[[str], None] | None = None):
        self.executor = executor
        self.config = config
        self.log = log
        self.names = [e.name for e in config.experts]
        self.caps = [executor.capabilities(n) for n in self.names]
        self.cfgs = [config.expert(n) for n in self.names]
        self.replay = {n for n, c in zip(self.names, self.caps) if c.replay_only}

    def _say(self, msg: str) -> None:
        if self.log:
            self.log(msg)

    def requests(self, part: Cells, rows: list[int], cols: list[int]
                 ) -> tuple[list[GenRequest | None], list[str | None]]:
        """The request of each cell, or None with why it is not sent."""
        out: list[GenRequest | None] = []
        why: list[str | None] = []
        qs, kinds, samples = part.table.questions, part.kinds, part.samples
        for i, j in zip(rows, cols):
            kind = kinds[i] if kinds is not None else part.kind
            cfg, can = self.cfgs[j], self.caps[j]
            r, _, no = checked(kind, qs[i], cfg, can, samples[i] if samples is not None else 0)
            out.append(r)
            why.append(no)
        return out, why

    def generate(self, parts: list[Cells], name: str = "experts", last: str | None = None,
                 whole: bool = False, on_plan: Callable[[Plan], None] | None = None,
                 on_token: CellToken | None = None) -> Phase:
        t0 = time.perf_counter()
        phase = Phase(name)
        wanted = np.zeros(len(self.names), bool)
        for p in parts:
            wanted |= p.mask.any(axis=0)
        experts = [n for n, w in zip(self.names, wanted) if w]
        ex = self.executor
        stages = [experts] if whole else ex.stages(experts, last=last)
        col = {n: j for j, n in enumerate(self.names)}
        duplicates = loads = 0
        header = [PLAN_HEADER]
        for stage in stages:
            cols = sorted(col[n] for n in stage)  # each request's experts in pool order
            cells = []  # (part index, row, expert column) of every cell of the stage, in order
            for k, p in enumerate(parts):
                rows, which = np.nonzero(p.mask[:, cols])
                cells += zip([k] * len(rows), rows.tolist(), np.asarray(cols)[which].tolist())
            step = CHUNK if (ex.keeps_loaded and not whole) else max(len(cells), 1)
            groups: dict[tuple, list] = {}  # load key -> [label, experts, jobs, cached]
            for start in range(0, len(cells), step):
                chunk = cells[start:start + step]
                refused = self._run(parts, chunk, phase, name, last, whole, on_plan, on_token,
                                    groups)
                duplicates += refused
            loads += sum(1 for _, _, jobs, cached in groups.values() if jobs > cached)
            if not whole and groups:
                self._say("\n".join(f"[{name}] {line}" for line in
                                    header + [plan_row(*row) for row in groups.values()]))
                header = []
        if phase.requests and not whole:
            self._say(f"[{name}] " + plan_summary(phase.requests, duplicates, phase.cached,
                                                 loads, phase.requests))
        phase.seconds = time.perf_counter() - t0
        return phase

    def _run(self, parts: list[Cells], chunk: list[tuple[int, int, int]], phase: Phase,
             name: str, last: str | None, whole: bool, on_plan, on_token, groups: dict) -> int:
        """Plan and run one chunk of cells into their tables; returns its duplicates."""
        built: list[GenRequest | None] = []
        why: list[str | None] = []
        for k in range(len(parts)):
            mine = [(i, j) for kk, i, j in chunk if kk == k]
            if mine:
                r, w = self.requests(parts[k], [i for i, _ in mine], [j for _, j in mine])
                built += r
                why += w
        # ``built`` is in part order; ``chunk`` is too (cells are listed part by part)
        send = [k for k, r in enumerate(built) if r is not None]
        requests = [built[k] for k in send]
        for k, w in enumerate(why):
            if w is not None:
                kk, i, j = chunk[k]
                parts[kk].table.fill([i], [j], [Generation(error=w)])
                phase.refused += 1
                phase.failed += 1
        plan = self.executor.plan(requests, last=last)
        if whole:
            phase.plans.append(plan)
            if on_plan is not None:
                on_plan(plan)
        stream = None
        if on_token is not None:
            def stream(n: int, piece: str) -> None:
                kk, i, j = chunk[send[n]]
                on_token(kk, i, j, piece)
        done = self.executor.run(requests, plan, on_token=stream) if requests else None
        gens: list[Generation] = done.generations if done is not None else []
        by_part: dict[int, list[tuple[int, int, Generation]]] = {}
        for n, g in zip(send, gens):
            kk, i, j = chunk[n]
            by_part.setdefault(kk, []).append((i, j, g))
        for kk, items in by_part.items():
            parts[kk].table.fill([i for i, _, _ in items], [j for _, j, _ in items],
                                 [g for _, _, g in items])
        unique = [i for g in plan.groups for i in g.indices]
        phase.requests += len(requests) + sum(1 for w in why if w is not None)
        phase.unique += len(unique)
        phase.cached += len(plan.hits)
        if done is not None:
            phase.generations += done.stats.generations
            phase.failed += done.stats.failed_generations
            phase.loads += done.stats.loads
            phase.replayed += sum(1 for i in unique if requests[i].expert in self.replay
                                  and gens[i].error is None and not gens[i].cached)
        for g in plan.groups:
            row = groups.setdefault(g.key, [g.label, g.experts, 0, 0])
            row[2] += len(g.indices)
            row[3] += g.cached
        return len(plan.same_as)
