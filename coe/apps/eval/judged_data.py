"""A judged pool's recorded answers as arrays, and what every judged strategy reads.

``JudgedData.load`` reads the pool's replay records (``coe pool`` on a pairwise-judged folder:
each record carries ``p_win``, ``chars`` and ``ref_chars`` beside the text; checked with
pydantic, a bad record is one line naming file:line) for the training ("validation") and
test questions, embeds every answer with the pool's encoder (rows unit-norm), and fits the
instruction difficulties of the length-controlled win rate on the training half
(``coe.learned.winrate``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coe.aggregation.consensus import consensus
from coe.core.config import PoolConfig
from coe.core.errors import ConfigError
from coe.core.types import Question
from coe.learned.embeddings import shared_embedder
from coe.learned.winrate import Difficulty, LcFit, length_controlled


class JudgedRecord(BaseModel):
    """A judged pool's replay record."""

    model_config = ConfigDict(extra="ignore")
    id: str
    text: str
    p_win: float = Field(ge=0.0, le=1.0)
    chars: int = Field(ge=0)
    ref_chars: int = Field(ge=0)


@dataclass
class JudgedSet:
    """One question set: per question (rows) and expert (columns)."""

    name: str
    questions: list[Question]
    p: np.ndarray  # judged p_win
    chars: np.ndarray  # answer length, characters
    ref_chars: np.ndarray  # (n,) the reference's length
    vectors: np.ndarray  # (n, experts, d) unit-norm answer embeddings (zero for an empty one)
    gamma: np.ndarray | None = None  # (n,) instruction difficulty

    @property
    def ids(self) -> list[str]:
        return [q.id for q in self.questions]

    @property
    def delta(self) -> np.ndarray:
        return self.chars - self.ref_chars[:, None]

    def rows(self) -> np.ndarray:
        return np.arange(len(self.questions))


def _read_replay(path, wanted: set[str]) -> dict[str, JudgedRecord]:
    out: dict[str, JudgedRecord] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = JudgedRecord.model_validate_json(line)
            except ValidationError as e:
                first = e.errors()[0]
                fld = ".".join(str(p) for p in first["loc"]) or "record"
                raise ConfigError(f"{path}:{lineno}: not a judged replay record (field {fld!r}: "
                                  f"{first['msg']}); build the pool with coe pool on a "
                                  "pairwise-judged folder") from None
            if rec.id in wanted:
                out[rec.id] = rec
    return out


def _as_questions(qs) -> list[Question]:
    return [q if isinstance(q, Question) else Question.model_validate(q) for q in qs]


class JudgedData:
    """Both question sets of a judged pool, and the difficulty fit of the training half."""

    def __init__(self, config: PoolConfig, train: JudgedSet, test: JudgedSet):
        self.config = config
        self.names = [e.name for e in config.experts]
        self.train, self.test = train, test
        self.difficulty = Difficulty.fit(train.ids, train.p, train.delta, self.names)
        for s in (train, test):
            s.gamma = self.difficulty.gamma(s.ids, s.p, s.delta)
        self.strength = np.array([e.strength if e.strength is not None else float(m)
                                  for e, m in zip(config.experts, train.p.mean(axis=0))])

    @classmethod
    def load(cls, config: PoolConfig, train, test) -> "JudgedData":
        train, test = _as_questions(train), _as_questions(test)
        ids = {q.id for q in train} | {q.id for q in test}
        recs = {e.name: _read_replay(config.resolve_path(e.model), ids) for e in config.experts}
        for name, got in recs.items():
            missing = [i for i in ids if i not in got]
            if missing:
                raise ConfigError(f"replay records of {name}: no judged answer to question "
                                  f"{missing[0]!r} ({len(missing)} missing)")
        embedder = shared_embedder(config.embeddings.model, config.embeddings.batch_size,
                                   str(config.base_dir))

        def part(name: str, qs: list[Question]) -> JudgedSet:
            grid = [[recs[e.name][q.id] for e in config.experts] for q in qs]
            texts = [r.text for row in grid for r in row]
            vec = np.asarray(embedder.encode(texts), np.float32) if texts else \
                np.zeros((0, 1), np.float32)
            vec[[not t.strip() for t in texts]] = 0.0
            n, e = len(qs), len(config.experts)
            return JudgedSet(name, qs, np.array([[r.p_win for r in row] for row in grid]).reshape(n, e),
                             np.array([[r.chars for r in row] for row in grid], float).reshape(n, e),
                             np.array([row[0].ref_chars for row in grid], float),
                             vec.reshape(n, e, vec.shape[-1]))

        return cls(config, part("validation", train), part("test", test))

    # -- scoring a selection ----------------------------------------------------------------
    @staticmethod
    def picked(s: JudgedSet, pick: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The picked answers' p_win and length difference to the reference."""
        rows = s.rows()
        return s.p[rows, pick], s.delta[rows, pick]

    def lc(self, s: JudgedSet, pick: np.ndarray) -> LcFit:
        p, d = self.picked(s, pick)
        return length_controlled(p, d, s.gamma)

    # -- consensus --------------------------------------------------------------------------
    @staticmethod
    def vote(s: JudgedSet, candidates: np.ndarray, weights: np.ndarray,
             threshold: float) -> np.ndarray:
        """Per question, the consensus winner among ``candidates`` (questions x slots, expert
        indices, -1 for none) weighted by ``weights`` (same shape)."""
        out = np.empty(len(candidates), np.int64)
        for i, (cand, w) in enumerate(zip(candidates.tolist(), weights)):
            keep = [k for k, j in enumerate(cand) if j >= 0]
            js = [cand[k] for k in keep]
            c = consensus(s.vectors[i, js], np.asarray(w)[keep], threshold)
            out[i] = js[c.winner]
        return out

    def choose_threshold(self, thresholds) -> tuple[float, dict[float, float]]:
        """The consensus threshold of the all-experts vote with the best LC win rate on the
        training half (ties: the lower threshold)."""
        s = self.train
        every = np.tile(np.arange(len(self.names)), (len(s.questions), 1))
        w = np.tile(self.strength, (len(s.questions), 1))
        scores = {float(t): round(self.lc(s, self.vote(s, every, w, t)).lc_win_rate, 2)
                  for t in thresholds}
        best = max(scores, key=lambda t: (scores[t], -t))
        return best, scores
