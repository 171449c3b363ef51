"""Learned answer selection: which of a question's candidate answers is right.

Every distinct answer the recruited experts gave is a *candidate*. A logistic regression
(scikit-learn, on standardised features) scores each candidate from answer-aware features
that cost nothing beyond the answers themselves:

- which experts gave it (one indicator per expert of the profiled pool), and the same
  indicators times each expert's *local accuracy* (``coe.learned.neighbours``: its accuracy on the
  question's nearest profiled questions);
- the summed and the highest local accuracy of the experts that gave it, their summed global
  accuracy, and the summed local accuracy of the recruits that answered something else;
- how many gave it, as a count and a share of those that answered, whether it is the
  plurality, and whether the locally strongest answering recruit gave it;
- how many experts were recruited and how many of them gave no answer (failed, or no answer
  could be extracted).

The candidate with the highest probability wins; that probability is the answer's
confidence (calibrated: the cascade stops on it). Response length was tried and left out:
5-fold cross-validation on the MMLU-Pro train half gave 49.5 % with it, 49.7 % without.

**Training** (``coe profile``, from the validation record): every profiled question is seen
with several recruit sets, so one model serves any router and any cascade round: all the
experts, and the 1, 2, ... ``MAX_PREFIX`` locally strongest (a router's top k, a cascade's
first rounds). The local accuracies are leave-one-out (a question is not its own neighbour).

**Cross-fitting.** Besides the model fitted on every profiled question, ``FOLDS`` models are
each fitted without one fold of them (folds by a hash of the question id). A question the
record holds (same id and text: ``coe eval`` scoring strategies on the validation set) is
scored by the model that did not see it, so validation figures are out-of-sample.

The fitted models are a few hundred numbers, kept in the profiles JSON.
"""

from __future__ import annotations

import hashlib

import numpy as np
from pydantic import BaseModel

from coe.core.errors import ConfigError
from coe.core.types import ExpertResponse, Question
from coe.learned.neighbours import NO_ANSWER, Neighbourhood, ValidationRecord

FOLDS = 5
MAX_PREFIX = 5  # recruit sets in training: the top 1..MAX_PREFIX by local accuracy, and all
C = 1.0  # inverse regularisation strength (5-fold CV on the train half: 0.1 and 1 within 0.1 pt)

GLOBAL_FEATURES = ["sum_local", "max_local", "sum_global", "local_against", "count", "share",
                   "plurality", "leader", "recruited", "no_answer"]


class LinearModel(BaseModel):
    """A standardised logistic regression: p = sigmoid(((x - mean) / scale) . coef + b)."""

    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float

    def probability(self, x: np.ndarray) -> np.ndarray:
        z = ((x - np.asarray(self.mean)) / np.asarray(self.scale)) @ np.asarray(self.coef)
        return 1.0 / (1.0 + np.exp(-(z + self.intercept)))


class SelectorModel(BaseModel):
    experts: list[str]
    features: list[str]
    neighbours: int
    questions: int  # profiled questions it was fitted on
    model: LinearModel
    folds: list[LinearModel]  # folds[f]: fitted without fold f


def fold_of(ids: list[str], folds: int = FOLDS) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.sha1(i.encode("utf-8")).digest()[:4], "big") % folds
                     for i in ids], np.int64)


def feature_names(experts: list[str]) -> list[str]:
    return ([f"gave:{e}" for e in experts] + [f"gave_local:{e}" for e in experts]
            + GLOBAL_FEATURES)


def candidates(codes: np.ndarray, asked: np.ndarray, local: np.ndarray,
               glob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate rows of a batch: (features, question index, answer code).

    ``codes`` (questions x experts): each expert's answer code, ``NO_ANSWER`` when it gave
    none; ``asked``: recruited (and so counted, answered or not); ``local``: local accuracies;
    ``glob``: global accuracies (experts,)."""
    gave_any = asked & (codes != NO_ANSWER)
    qi, ej = np.nonzero(gave_any)
    if not len(qi):
        return np.zeros((0, 2 * codes.shape[1] + len(GLOBAL_FEATURES))), qi, qi
    pairs = np.unique(np.stack([qi, codes[qi, ej]], axis=1), axis=0)
    q, c = pairs[:, 0], pairs[:, 1]
    gave = (codes[q] == c[:, None]) & gave_any[q]
    answered = gave_any.sum(axis=1)
    count = gave.sum(axis=1)
    most = np.zeros(len(codes), np.int64)
    np.maximum.at(most, q, count)
    lq = local[q]
    strongest = np.argmax(np.where(gave_any[q], lq, -1.0), axis=1)
    x = np.hstack([
        gave, gave * lq,
        np.stack([(gave * lq).sum(axis=1), np.where(gave, lq, 0.0).max(axis=1),
                  (gave * glob).sum(axis=1), ((gave_any[q] & ~gave) * lq).sum(axis=1),
                  count, count / np.maximum(answered[q], 1), count == most[q],
                  gave[np.arange(len(q)), strongest], asked[q].sum(axis=1),
                  (asked[q] & ~gave_any[q]).sum(axis=1)], axis=1)])
    return x.astype(np.float64), q, c


def best_per_question(n: int, q: np.ndarray, c: np.ndarray,
                      p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(winning code, its probability) per question; NO_ANSWER and 0 without candidates.
    Ties go to the lower code (the first answer seen)."""
    best = np.full(n, NO_ANSWER, np.int64)
    conf = np.zeros(n)
    order = np.lexsort((c, -p, q))
    first = np.ones(len(order), bool)
    first[1:] = q[order][1:] != q[order][:-1]
    best[q[order][first]] = c[order][first]
    conf[q[order][first]] = p[order][first]
    return best, conf


def recruit_sets(local: np.ndarray, glob: np.ndarray, max_prefix: int = MAX_PREFIX) -> list[np.ndarray]:
    """Every expert, then the 1 .. max_prefix locally strongest per question."""
    order = np.argsort(-(local + 1e-9 * glob), axis=1, kind="stable")
    sets = [np.ones(local.shape, bool)]
    for m in range(1, min(max_prefix, local.shape[1] - 1) + 1):
        s = np.zeros(local.shape, bool)
        np.put_along_axis(s, order[:, :m], True, axis=1)
        sets.append(s)
    return sets


def _fit(x: np.ndarray, y: np.ndarray) -> LinearModel:
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    # one thread: see coe.learned.classifier.one_thread (OpenMP beside a busy process)
    with threadpool_limits(limits=1):
        lr = LogisticRegression(C=C, max_iter=2000).fit((x - mean) / scale, y)
    return LinearModel(mean=mean.tolist(), scale=scale.tolist(), coef=lr.coef_[0].tolist(),
                       intercept=float(lr.intercept_[0]))


def fit_selector(record: ValidationRecord, hood: Neighbourhood) -> SelectorModel | None:
    """The selector fitted on the record (None when it holds no right answer or no wrong
    one: nothing to learn)."""
    local = hood.local_of_record()
    glob = hood.glob
    parts = [candidates(record.answers, s, local, glob)
             for s in recruit_sets(local, glob)]
    x = np.vstack([p[0] for p in parts])
    q = np.concatenate([p[1] for p in parts])
    y = np.concatenate([p[2] for p in parts]) == record.gold[q]
    if y.all() or not y.any():
        return None
    fold = fold_of(record.ids)[q]
    return SelectorModel(
        experts=record.experts, features=feature_names(record.experts),
        neighbours=hood.neighbours, questions=len(record), model=_fit(x, y),
        folds=[_fit(x[fold != f], y[fold != f]) for f in range(FOLDS)
               if (fold != f).any() and y[fold != f].any() and not y[fold != f].all()])


class Selector:
    """A fitted ``SelectorModel`` with its record: picks answers for a batch."""

    def __init__(self, model: SelectorModel, hood: Neighbourhood):
        self.model = model
        self.hood = hood
        self.record = hood.record
        self.experts = model.experts
        # cross-fitting needs every fold's model (a tiny record may lack some)
        self._fold_models = model.folds if len(model.folds) == FOLDS else None

    def probabilities(self, x: np.ndarray, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Each candidate's probability; a question the record holds (``rows`` >= 0) is
        scored by the fold model fitted without it."""
        p = self.model.model.probability(x) if len(x) else np.zeros(0)
        if self._fold_models is None or not len(x):
            return p
        fold = np.full(len(rows), -1)
        held = rows >= 0
        fold[held] = fold_of([self.record.ids[r] for r in rows[held]])
        cand_fold = fold[q]
        for f, m in enumerate(self._fold_models):
            mine = cand_fold == f
            if mine.any():
                p[mine] = m.probability(x[mine])
        return p

    def select(self, codes: np.ndarray, asked: np.ndarray, local: np.ndarray,
               rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(winning code, confidence) per question, from answer codes and recruits."""
        x, q, c = candidates(codes, asked, local, self.hood.glob)
        return best_per_question(len(codes), q, c, self.probabilities(x, q, rows))

    def choose(self, questions: list[Question],
               responses: list[list[ExpertResponse]]) -> tuple[list[str | None], list[float]]:
        """The selected answer and its probability per question, from each question's
        recruits' responses (a failed one counts as recruited, without an answer)."""
        col = {e: j for j, e in enumerate(self.experts)}
        n, e = len(questions), len(self.experts)
        codes = np.full((n, e), NO_ANSWER, np.int64)
        asked = np.zeros((n, e), bool)
        vocab: dict[str, int] = {}
        for i, resp in enumerate(responses):
            for r in resp:
                j = col.get(r.expert)
                if j is None:
                    continue
                asked[i, j] = True
                if r.error is None and r.answer is not None:
                    codes[i, j] = vocab.setdefault(r.answer, len(vocab))
        best, conf = self.select(codes, asked, self.hood.local(questions),
                                 self.record.rows_of(questions))
        names = list(vocab)
        return [names[b] if b != NO_ANSWER else None for b in best.tolist()], conf.tolist()


def build_selector(config, model: SelectorModel, hood: Neighbourhood) -> Selector:
    """The selector for ``config``'s pool, with its neighbourhood over the record."""
    missing = [e.name for e in config.experts if e.name not in model.experts]
    if missing:
        raise ConfigError(f"the answer selector was trained without {', '.join(missing)} "
                          "(run coe profile with this pool)")
    return Selector(model, hood)
