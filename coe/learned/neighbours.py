"""The validation record behind the kNN router and the learned answer selector.

``coe profile`` keeps, besides the per-skill tallies of ``coe.learned.profiles``, a record of the
validation run: every profiled question's embedding and every expert's extracted answer and
whether it was right. It is a sidecar array file next to the profiles JSON
(``profiles.json`` -> ``profiles.npz``, numpy's ``savez``: plain arrays, loaded without
pickle), named and checked (size and SHA-256) by the JSON, so the JSON stays readable.

``Neighbourhood`` answers "how good is each expert on questions like this one": the
question's ``neighbours`` nearest profiled questions by cosine similarity, and each expert's
accuracy on them shrunk towards its global accuracy (``prior`` pseudo-questions at the global
accuracy, so 200 neighbours move it but three do not).

**A profiled question is never its own neighbour.** A question whose id *and* text are in
the record (a validation question routed again, as ``coe eval`` does to score strategies on
the validation set) is left out of its own neighbourhood: leave-one-out, so the local
accuracies of validation questions are what they would be for an unseen question.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coe.core.errors import ConfigError
from coe.core.types import ExpertResponse, Question
from coe.learned.embeddings import shared_embedder, static_tag
from coe.text.answers import is_correct

#: pseudo-questions at the expert's global accuracy added to its neighbourhood tally
PRIOR = 20.0
#: query questions compared with the record at a time (a block x record similarity matrix)
BLOCK = 1024
#: questions whose local accuracies are remembered (a cascade asks about the same questions
#: round after round); beyond it the memo starts again
MEMO = 100_000

NO_ANSWER = -1  # answer code: not asked, failed, or no answer extracted
UNKNOWN = -2  # answer code: an answer the record's vocabulary does not hold


def text_hash(texts: list[str]) -> np.ndarray:
    """The first 8 bytes of each text's SHA-1, as unsigned integers."""
    return np.array([int.from_bytes(hashlib.sha1(t.encode("utf-8")).digest()[:8], "big")
                     for t in texts], dtype=np.uint64)


@dataclass
class ValidationRecord:
    """Per profiled question (rows) and expert (columns): the answer given (a code into
    ``vocab``; ``NO_ANSWER`` when failed or none was extracted) and whether it was right
    (1 right, 0 wrong, -1 no usable generation), plus the question's embedding."""

    ids: list[str]
    hashes: np.ndarray  # uint64 (n,)
    embeddings: np.ndarray  # float16 (n, d), unit norm
    experts: list[str]
    answers: np.ndarray  # int32 (n, E)
    right: np.ndarray  # int8 (n, E)
    gold: np.ndarray  # int32 (n,): the gold answer's code (UNKNOWN when not in vocab)
    vocab: list[str]
    embedding_model: str
    embedding_tag: str | None

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_run(cls, questions: list[Question], responses: list[list[ExpertResponse]],
                 experts: list[str], embeddings: np.ndarray, embedding_model: str,
                 embedding_tag: str | None) -> "ValidationRecord":
        col = {e: j for j, e in enumerate(experts)}
        vocab: dict[str, int] = {}
        answers = np.full((len(questions), len(experts)), NO_ANSWER, np.int32)
        right = np.full((len(questions), len(experts)), -1, np.int8)
        gold = np.full(len(questions), UNKNOWN, np.int32)
        for i, (q, resp) in enumerate(zip(questions, responses)):
            for r in resp:
                if r.error is not None or r.expert not in col:
                    continue
                j = col[r.expert]
                right[i, j] = 1 if is_correct(r.answer, q) else 0
                if r.answer is not None:
                    answers[i, j] = vocab.setdefault(r.answer, len(vocab))
                    if right[i, j] == 1:
                        gold[i] = answers[i, j]
        return cls(ids=[q.id for q in questions], hashes=text_hash([q.question for q in questions]),
                   embeddings=np.asarray(embeddings, np.float16), experts=list(experts),
                   answers=answers, right=right, gold=gold, vocab=list(vocab),
                   embedding_model=embedding_model, embedding_tag=embedding_tag)

    def extend(self, other: "ValidationRecord") -> "ValidationRecord":
        """This record with ``other``'s questions after it (same experts and embeddings)."""
        if other.experts != self.experts:
            raise ConfigError("the profiles' validation record has experts "
                              f"{', '.join(self.experts)}; this pool has {', '.join(other.experts)} "
                              "(build new profiles for a new pool)")
        if (other.embedding_model, other.embedding_tag) != (self.embedding_model, self.embedding_tag):
            raise ConfigError(f"the profiles' validation record was embedded with "
                              f"{self.embedding_model}; this pool embeds with "
                              f"{other.embedding_model} (build new profiles)")
        vocab = {a: i for i, a in enumerate(self.vocab)}
        remap = np.array([vocab.setdefault(a, len(vocab)) for a in other.vocab] + [0], np.int32)

        def codes(a: np.ndarray) -> np.ndarray:
            return np.where(a >= 0, remap[np.maximum(a, 0)], a)

        return ValidationRecord(
            ids=self.ids + other.ids, hashes=np.concatenate([self.hashes, other.hashes]),
            embeddings=np.vstack([self.embeddings, other.embeddings]), experts=self.experts,
            answers=np.vstack([self.answers, codes(other.answers)]),
            right=np.vstack([self.right, other.right]),
            gold=np.concatenate([self.gold, codes(other.gold)]), vocab=list(vocab),
            embedding_model=self.embedding_model, embedding_tag=self.embedding_tag)

    def global_accuracy(self) -> np.ndarray:
        ok = self.right >= 0
        return (self.right == 1).sum(axis=0) / np.maximum(ok.sum(axis=0), 1)

    def rows_of(self, questions: list[Question]) -> np.ndarray:
        """Each question's row in the record when the record holds it (same id and same
        text), else -1."""
        row = {qid: i for i, qid in enumerate(self.ids)}
        rows = np.array([row.get(q.id, -1) for q in questions], np.int64)
        if (rows >= 0).any():
            same = text_hash([q.question for q in questions]) == self.hashes[np.maximum(rows, 0)]
            rows[~same] = -1
        return rows

    # -- the sidecar file -------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Written under a temporary name, then renamed: never half a file. A failure names
        ``path``."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, ids=np.array(self.ids, dtype=str), hashes=self.hashes,
                         embeddings=self.embeddings, experts=np.array(self.experts, dtype=str),
                         answers=self.answers, right=self.right, gold=self.gold,
                         vocab=np.array(self.vocab, dtype=str))
            tmp.replace(path)
        except OSError as e:
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror, str(path)) from None

    @classmethod
    def load(cls, path: Path, embedding_model: str, embedding_tag: str | None) -> "ValidationRecord":
        try:
            with np.load(path, allow_pickle=False) as z:
                rec = cls(ids=z["ids"].tolist(), hashes=z["hashes"], embeddings=z["embeddings"],
                          experts=z["experts"].tolist(), answers=z["answers"], right=z["right"],
                          gold=z["gold"], vocab=z["vocab"].tolist(),
                          embedding_model=embedding_model, embedding_tag=embedding_tag)
        except (OSError, KeyError, ValueError) as e:
            raise ConfigError(f"{path}: not a coe validation record ({type(e).__name__}: {e})") \
                from None
        n, e = len(rec.ids), len(rec.experts)
        if rec.answers.shape != (n, e) or rec.right.shape != (n, e) or len(rec.embeddings) != n:
            raise ConfigError(f"{path}: validation record arrays disagree in shape")
        return rec


class Neighbourhood:
    """Each expert's accuracy on a question's nearest profiled questions (see the module)."""

    def __init__(self, record: ValidationRecord, config, neighbours: int = 200,
                 prior: float = PRIOR):
        self.record = record
        self.neighbours = max(1, min(neighbours, len(record) - 1 if len(record) > 1 else 1))
        self.prior = prior
        ref = config.embeddings.model
        here = static_tag(ref, str(config.base_dir))
        if (ref, here) != (record.embedding_model, record.embedding_tag):
            raise ConfigError(
                f"the profiles' validation record was embedded with {record.embedding_model}"
                + (f" (static model {record.embedding_tag})" if record.embedding_tag else "")
                + f", this pool embeds with {ref}" + (f" (static model {here})" if here else "")
                + ": rebuild the profiles with coe profile")
        self.embedder = shared_embedder(ref, config.embeddings.batch_size, str(config.base_dir))
        self.vectors = np.asarray(record.embeddings, np.float32)
        self.right = (record.right == 1).astype(np.float32)
        self.answered = (record.right >= 0).astype(np.float32)
        self.glob = record.global_accuracy()
        self._memo: dict[tuple[str, str], np.ndarray] = {}  # (id, text) -> local accuracies
        self._record_local: np.ndarray | None = None
        self._lock = threading.Lock()

    def local(self, questions: list[Question]) -> np.ndarray:
        """Local accuracy (questions x record experts) of each expert around each question
        (remembered for the last ``MEMO`` questions asked about)."""
        out = np.zeros((len(questions), len(self.record.experts)))
        keys = [(q.id, q.question) for q in questions]
        with self._lock:
            hits = [self._memo.get(k) for k in keys]
        todo = [i for i, h in enumerate(hits) if h is None]
        if todo:
            ask = [questions[i] for i in todo]
            vecs = self.embedder.encode([q.question for q in ask])
            out[todo] = self.local_of(vecs, self.record.rows_of(ask))
            with self._lock:
                if len(self._memo) + len(todo) > MEMO:
                    self._memo.clear()
                for i in todo:
                    self._memo[keys[i]] = out[i].copy()
        for i, h in enumerate(hits):
            if h is not None:
                out[i] = h
        return out

    def local_of(self, vecs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Local accuracies for query vectors; ``rows`` >= 0 are the queries' own rows in the
        record, left out of their neighbourhoods."""
        out = np.empty((len(vecs), len(self.record.experts)))
        n = self.neighbours
        for s in range(0, len(vecs), BLOCK):
            sims = vecs[s:s + BLOCK] @ self.vectors.T
            own = rows[s:s + BLOCK]
            mine = np.flatnonzero(own >= 0)
            sims[mine, own[mine]] = -np.inf
            idx = np.argpartition(-sims, n - 1, axis=1)[:, :n]
            right = self.right[idx].sum(axis=1)
            seen = self.answered[idx].sum(axis=1)
            out[s:s + BLOCK] = (right + self.prior * self.glob) / (seen + self.prior)
        return out

    def local_of_record(self) -> np.ndarray:
        """Leave-one-out local accuracies of every question of the record (computed once)."""
        if self._record_local is None:
            self._record_local = self.local_of(self.vectors, np.arange(len(self.record)))
        return self._record_local
