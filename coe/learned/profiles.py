"""Model profiles (Symbolic-MoE): what each expert is good at, learned on a validation set.

This module is the data: the file format, loading, checking against a pool, and adding
graded answers. Building profiles runs experts, so it lives above the orchestrator, in
``coe.apps.profile`` (``coe profile VALIDATION.jsonl -o profiles.json``), which runs every expert
of the pool on questions with gold answers, infers each question's skills, and keeps per
expert:

- ``skills``: for every skill, +w for each question needing it that the expert got right and
  -w for each it got wrong (w is the skill's weight in the question: 1 for a keyword among n,
  1/n; a softmax share for vocabulary skills), and ``seen``, the summed weights;
- ``correct``/``total``: its global accuracy;

and per aggregator candidate, its *aggregation* accuracy: given the experts' responses, does
it write the gold answer. The file is readable JSON; profiling more questions into an existing
file adds to it (questions already in it are skipped).

The profiles also keep the validation run itself (``record``): every profiled question's
embedding and every expert's answer, in a sidecar array file the JSON names and checks
(``coe.learned.neighbours``), for the kNN router and the learned answer selector (``selector``: the
fitted model, a few hundred numbers, in the JSON).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field, PrivateAttr, computed_field
from scipy import sparse

from coe.core.errors import ConfigError
from coe.io.model_ref import file_sha256
from coe.learned.neighbours import Neighbourhood, ValidationRecord
from coe.learned.selector import Selector, SelectorModel, build_selector
from coe.text.answers import is_correct

FORMAT_VERSION = 1

#: ``Profiles.neighbourhood``'s shared neighbourhoods (the last few record files)
_SHARED: dict[tuple, Neighbourhood] = {}
_SHARED_LOCK = threading.Lock()


class ExpertProfile(BaseModel):
    correct: int = 0
    total: int = 0
    skills: dict[str, float] = Field(default_factory=dict)  # +w right, -w wrong
    seen: dict[str, float] = Field(default_factory=dict)  # summed weights per skill

    @computed_field  # written to the file for the reader; recomputed on load
    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def add(self, skills: dict[str, float], right: bool) -> None:
        self.total += 1
        self.correct += int(right)
        for s, w in skills.items():
            self.skills[s] = round(self.skills.get(s, 0.0) + (w if right else -w), 6)
            self.seen[s] = round(self.seen.get(s, 0.0) + w, 6)


class AggregatorProfile(BaseModel):
    correct: int = 0
    total: int = 0

    @computed_field
    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


class RecordInfo(BaseModel):
    """Where the validation record is (relative to the JSON) and what it must be."""

    file: str
    sha256: str
    questions: int
    embedding_model: str
    embedding_tag: str | None = None


class Profiles(BaseModel):
    version: int = FORMAT_VERSION
    skill_source: str
    experts: dict[str, ExpertProfile] = Field(default_factory=dict)
    aggregators: dict[str, AggregatorProfile] = Field(default_factory=dict)
    record: RecordInfo | None = None  # the validation run, for kNN routing and selection
    selector: SelectorModel | None = None  # the learned answer selector, fitted on the record
    questions: list[str] = Field(default_factory=list)  # ids profiled so far
    _path: Path | None = PrivateAttr(None)
    _record: ValidationRecord | None = PrivateAttr(None)

    def attach_record(self, record: ValidationRecord) -> None:
        """The validation record to write beside the JSON on ``save``."""
        self._record = record

    def validation_record(self) -> ValidationRecord:
        """The validation record (read from the sidecar file and checked against the JSON)."""
        if self._record is not None:
            return self._record
        where = self._path or Path("profiles.json")
        if self.record is None:
            raise ConfigError(f"{where}: the profiles hold no validation record (they were "
                              "built by an older coe): rebuild them with coe profile")
        side = where.parent / self.record.file
        if not side.is_file():
            raise ConfigError(f"{side}: validation record not found (it belongs beside {where})")
        if file_sha256(side) != self.record.sha256:
            raise ConfigError(f"{side}: validation record does not match {where.name} "
                              "(changed or damaged): rebuild the profiles with coe profile")
        rec = ValidationRecord.load(side, self.record.embedding_model, self.record.embedding_tag)
        if len(rec) != self.record.questions:
            raise ConfigError(f"{side}: {len(rec)} questions, {where.name} says "
                              f"{self.record.questions}")
        self._record = rec
        return rec

    def selector_for(self, config) -> Selector:
        """The fitted answer selector, ready for ``config``'s pool."""
        if self.selector is None:
            raise ConfigError(f"{self._path or 'profiles'}: no answer selector (rebuild the "
                              "profiles with coe profile)")
        return build_selector(config, self.selector,
                              self.neighbourhood(config, self.selector.neighbours))

    def neighbourhood(self, config, neighbours: int) -> Neighbourhood:
        """The validation record's ``Neighbourhood`` for ``config``'s embeddings: one per
        process for a given record file and size, so a router and a selector over the same
        profiles share one memo of local accuracies."""
        if self._path is None or self.record is None:
            return Neighbourhood(self.validation_record(), config, neighbours)
        key = (str(self._path.resolve().parent / self.record.file), self.record.sha256,
               neighbours, config.embeddings.model, str(config.base_dir))
        with _SHARED_LOCK:
            hood = _SHARED.get(key)
        if hood is None:
            hood = Neighbourhood(self.validation_record(), config, neighbours)
            with _SHARED_LOCK:
                _SHARED[key] = hood
                while len(_SHARED) > 4:
                    _SHARED.pop(next(iter(_SHARED)))
        return hood

    def skill_names(self) -> list[str]:
        names: dict[str, None] = {}
        for p in self.experts.values():
            names.update(dict.fromkeys(p.skills))
        return list(names)

    def best_aggregator(self) -> str | None:
        scored = [(a.accuracy, a.total, name) for name, a in self.aggregators.items() if a.total]
        return max(scored)[2] if scored else None

    def save(self, path: str | Path) -> None:
        """Indented JSON, the profiles first and the (long) list of question ids last, on one
        line, so the file reads from the top."""
        path = Path(path)
        if self._record is not None:
            side = path.with_suffix(".npz")
            self._record.save(side)
            self.record = RecordInfo(file=side.name, sha256=file_sha256(side),
                                     questions=len(self._record),
                                     embedding_model=self._record.embedding_model,
                                     embedding_tag=self._record.embedding_tag)
        data = json.loads(self.model_dump_json())
        ids = data.pop("questions")
        text = json.dumps({**data, "questions": "__ids__"}, indent=1, ensure_ascii=False)
        head, _, tail = text.rpartition('"__ids__"')
        path.write_text(head + json.dumps(ids) + tail + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Profiles":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: profiles file not found (build it with coe profile)")
        try:
            prof = cls.model_validate_json(p.read_text(encoding="utf-8"))
            prof._path = p
            return prof
        except ValueError as e:
            first = str(e).splitlines()
            raise ConfigError(f"{p}: not a coe profiles file ({first[1] if len(first) > 1 else e})") from None

    def check_pool(self, config, source: str = "profiles") -> None:
        """Every expert of the pool must have a profile."""
        missing = [e.name for e in config.experts if e.name not in self.experts]
        if missing:
            raise ConfigError(f"{source}: no profile for expert(s) {', '.join(missing)} "
                              f"(run coe profile with this pool)")


def skill_matrix(skills: list[dict[str, float]]) -> tuple[sparse.csr_matrix, list[str]]:
    """The questions' skill weights as a sparse matrix (questions x skill names, in
    first-seen order), and those names."""
    names = list(dict.fromkeys(s for sk in skills for s in sk))
    col = {n: i for i, n in enumerate(names)}
    weights = sparse.csr_matrix(
        ([w for sk in skills for w in sk.values()],
         ([qi for qi, sk in enumerate(skills) for _ in sk], [col[s] for sk in skills for s in sk])),
        shape=(len(skills), len(names)))
    return weights, names


def add_expert_results(prof: Profiles, questions, skills, responses) -> Profiles:
    """Add each expert's right/wrong answers on ``questions`` (with their inferred ``skills``
    and the experts' ``responses``) to the profiles. Failed generations do not count.

    Grading is per response; the tallies are two sparse products: the questions' skill
    weights (questions x skills), transposed, times the signed outcomes (+1 right, -1 wrong,
    0 failed or absent; questions x experts) gives every expert's net score per skill, and
    times the answered indicator its summed weights (``seen``)."""
    experts: dict[str, int] = {}
    rows, cols, signs = [], [], []
    for qi, (q, resp) in enumerate(zip(questions, responses)):
        for r in resp:
            if r.error is None:
                rows.append(qi)
                cols.append(experts.setdefault(r.expert, len(experts)))
                signs.append(1.0 if is_correct(r.answer, q) else -1.0)
    if not experts:
        return prof
    weights, names = skill_matrix(skills)
    outcome = sparse.csr_matrix((signs, (rows, cols)), shape=(len(questions), len(experts)))
    answered = abs(outcome)
    net = (weights.T @ outcome).toarray()  # skills x experts
    seen = (weights.T @ answered).toarray()
    right = np.asarray((outcome > 0).sum(axis=0)).ravel()
    total = np.asarray(answered.sum(axis=0)).ravel()
    for name, e in experts.items():
        p = prof.experts.setdefault(name, ExpertProfile())
        p.total += int(total[e])
        p.correct += int(right[e])
        for j in np.flatnonzero(seen[:, e]):
            s = names[j]
            p.skills[s] = round(p.skills.get(s, 0.0) + float(net[j, e]), 6)
            p.seen[s] = round(p.seen.get(s, 0.0) + float(seen[j, e]), 6)
    return prof
