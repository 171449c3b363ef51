"""The routes of one strategy over an evaluation's questions, held as arrays.

An evaluation compares a dozen strategies on every question: as ``Route`` objects (about a
kilobyte each) that is twelve times the questions in objects. ``RouteTable`` keeps, per
question, the recruited experts as indices into the pool and their weights (numpy arrays,
padded with -1 for routes of different lengths), and everything else a route says (category,
skills, confidence, reason, suggested aggregator) as one code into the list of its distinct
values: a strategy that sends every question to one expert costs a few bytes a question.

It is a sequence of ``Route``: ``table[i]`` builds question i's route again, equal to the one
the router made, for the aggregators, which take routes; ``mask()`` and ``counts()`` answer
the job's questions about every route at once (which generations are needed, how often each
expert is recruited) without building any.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np

from coe.core.types import Route

NONE = -1  # no expert in this slot (a shorter route)


class RouteTable(Sequence):
    """``ids``: the question ids (shared with the job); ``names``: the pool's experts, the
    index space of ``experts``; ``experts``/``weights``: int16/float64 arrays (questions x
    longest route); ``info``: per question, a code into ``values``, each a tuple
    (category, skills, confidence, reason, aggregator)."""

    def __init__(self, ids: list[str], names: list[str], experts: np.ndarray,
                 weights: np.ndarray, info: np.ndarray, values: list[tuple]):
        self.ids, self.names = ids, names
        self.experts, self.weights = experts, weights
        self.info, self.values = info, values

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def of(cls, ids: list[str], names: list[str], routes: list[Route],
           unknown: Callable[[str], object] | None = None) -> "RouteTable":
        """The table of ``routes`` (one per question, in order). An expert outside ``names``
        is handed to ``unknown`` (which raises the caller's error), else a KeyError."""
        col = {n: j for j, n in enumerate(names)}
        width = max((len(r.experts) for r in routes), default=0)
        experts = np.full((len(routes), width), NONE, np.int16)
        weights = np.zeros((len(routes), width))
        codes: dict[tuple, int] = {}
        info = np.empty(len(routes), np.int32)
        for i, r in enumerate(routes):
            for k, rec in enumerate(r.experts):
                if rec.name not in col and unknown is not None:
                    unknown(rec.name)
                experts[i, k] = col[rec.name]
                weights[i, k] = rec.weight
            key = (r.category, tuple(r.skills), r.confidence, r.reason, r.aggregator)
            info[i] = codes.setdefault(key, len(codes))
        return cls(ids, names, experts, weights, info, list(codes))

    @classmethod
    def concat(cls, ids: list[str], tables: list["RouteTable"]) -> "RouteTable":
        """The tables of consecutive blocks of ``ids``, as one."""
        if len(tables) == 1:
            return cls(ids, *(getattr(tables[0], a) for a in
                              ("names", "experts", "weights", "info", "values")))
        width = max((t.experts.shape[1] for t in tables), default=0)
        codes: dict[tuple, int] = {}
        experts, weights, info = [], [], []
        for t in tables:
            pad = width - t.experts.shape[1]
            experts.append(np.pad(t.experts, ((0, 0), (0, pad)), constant_values=NONE))
            weights.append(np.pad(t.weights, ((0, 0), (0, pad))))
            remap = np.array([codes.setdefault(v, len(codes)) for v in t.values], np.int32)
            info.append(remap[t.info] if len(t.values) else t.info)
        names = tables[0].names if tables else []
        return cls(ids, names, np.concatenate(experts) if experts else np.zeros((0, 0), np.int16),
                   np.concatenate(weights) if weights else np.zeros((0, 0)),
                   np.concatenate(info) if info else np.zeros(0, np.int32), list(codes))

    @classmethod
    def fixed(cls, ids: list[str], names: list[str], experts: list[str], reason: str = "",
              confidence: float | None = None) -> "RouteTable":
        """Every question recruits ``experts`` (weight 1 each), for ``reason``."""
        col = [names.index(n) for n in experts]
        n = len(ids)
        return cls(ids, names, np.tile(np.array(col, np.int16), (n, 1)),
                   np.ones((n, len(col))), np.zeros(n, np.int32),
                   [(None, (), confidence, reason, None)])

    @classmethod
    def from_arrays(cls, ids: list[str], names: list[str], experts: np.ndarray,
                    weights: np.ndarray, reason: str = "",
                    confidence: float | None = None) -> "RouteTable":
        return cls(ids, names, experts.astype(np.int16), weights.astype(np.float64),
                   np.zeros(len(ids), np.int32), [(None, (), confidence, reason, None)])

    @classmethod
    def union(cls, ids: list[str], names: list[str], mask: np.ndarray) -> "RouteTable":
        """The routes of ``mask`` (questions x experts): each question's experts in pool
        order, weight 1."""
        width = int(mask.sum(axis=1).max(initial=0))
        order = np.argsort(~mask, axis=1, kind="stable")[:, :width]  # True columns first
        experts = np.where(np.take_along_axis(mask, order, axis=1), order, NONE)
        return cls(ids, names, experts.astype(np.int16), np.ones(experts.shape),
                   np.zeros(len(ids), np.int32), [(None, (), None, "", None)])

    def with_reasons(self, suffixes: list[str]) -> "RouteTable":
        """The same routes, each question's reason followed by its suffix."""
        codes: dict[tuple, int] = {}
        info = np.empty(len(self), np.int32)
        for i, (code, tail) in enumerate(zip(self.info.tolist(), suffixes)):
            category, skills, confidence, reason, aggregator = self.values[code]
            key = (category, skills, confidence, reason + tail, aggregator)
            info[i] = codes.setdefault(key, len(codes))
        return RouteTable(self.ids, self.names, self.experts, self.weights, info, list(codes))

    def take(self, rows) -> "RouteTable":
        """The routes of questions ``rows`` (indices), in that order."""
        rows = np.asarray(rows, np.intp)
        return RouteTable([self.ids[i] for i in rows.tolist()], self.names, self.experts[rows],
                          self.weights[rows], self.info[rows], self.values)

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return self.routes(start, stop)
            return [self[j] for j in range(start, stop, step)]
        i = range(len(self))[i]  # a negative index counts from the end; IndexError past it
        return self.routes(i, i + 1)[0]

    def routes(self, start: int, stop: int) -> list[Route]:
        """The routes of questions start..stop-1 (one array read for all of them)."""
        names, values = self.names, self.values
        out = []
        for qid, row, ws, code in zip(self.ids[start:stop], self.experts[start:stop].tolist(),
                                      self.weights[start:stop].tolist(),
                                      self.info[start:stop].tolist()):
            category, skills, confidence, reason, aggregator = values[code]
            out.append(Route(question_id=qid, category=category, skills=list(skills),
                             confidence=confidence, reason=reason, aggregator=aggregator,
                             experts=[{"name": names[j], "weight": w}  # made Recruits
                                      for j, w in zip(row, ws) if j != NONE]))
        return out

    def recruited(self, i: int) -> list[int]:
        """Question i's experts (indices), in route order."""
        return [j for j in self.experts[i].tolist() if j != NONE]

    def mask(self) -> np.ndarray:
        """Questions x experts: which experts each question recruits."""
        out = np.zeros((len(self), len(self.names)), bool)
        rows, slots = np.nonzero(self.experts != NONE)
        out[rows, self.experts[rows, slots]] = True
        return out

    def counts(self) -> np.ndarray:
        """Per expert, the questions that recruit it (once per question)."""
        return self.mask().sum(axis=0)
