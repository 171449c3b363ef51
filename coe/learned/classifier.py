"""The learned step of Composition-of-Experts routing: question text -> category.

A scikit-learn classifier over sentence embeddings (the pool's ``embeddings.model``), logistic
regression by default; any estimator with ``predict_proba`` can take its place. It follows
scikit-learn's habits (``fit``, ``predict``, ``predict_proba``) and saves to one joblib file
holding the estimator, its category labels and the embedding model it was trained with.
``CategoryRouter`` uses it when the yaml's ``router.model_file`` names such a file; a file
trained on categories the yaml does not know is refused before any model loads.

**Cross-fitted.** Besides the classifier fitted on every training question, ``FOLDS`` copies
are each fitted without one fold of them (folds by a hash of the question text). A question
whose text was among the training questions is classified by the copy that did not see it,
so routing the training questions again (``coe eval`` scoring strategies on the validation
set the router was trained on) gives out-of-sample predictions, not memorised ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np

from coe.core import progress
from coe.core.errors import ConfigError
from coe.learned.embeddings import DEFAULT_MODEL, shared_embedder, static_tag
from coe.learned.neighbours import text_hash

FOLDS = 5

FORMAT = "coe-category-router/1"
ESTIMATORS = ("logreg", "knn", "svm")


def one_thread():
    """scikit-learn's OpenMP and BLAS on one thread. These problems are small (thousands of
    rows, 256 or 384 columns): threads gain little on an idle machine and, on a busy one,
    every parallel region waits for a descheduled thread; logistic regression on 6,016 MMLU-Pro
    questions took 18 s with two threads beside one other busy process, 0.7 s with one."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def make_estimator(name: str = "logreg"):
    if name == "logreg":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=2000, C=4.0)
    if name == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        return KNeighborsClassifier(n_neighbors=25, weights="distance", metric="cosine")
    if name == "svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import LinearSVC

        return CalibratedClassifierCV(LinearSVC(C=0.5))
    raise ConfigError(f"unknown estimator {name!r} (expected one of {', '.join(ESTIMATORS)})")


class LearnedCategoryClassifier:
    def __init__(self, estimator=None, embedding_model: str = DEFAULT_MODEL,
                 batch_size: int = 64, base_dir: str = ".", embedder=None):
        self.estimator = estimator if estimator is not None else make_estimator()
        self.embedding_model = embedding_model
        self.batch_size = batch_size
        self.base_dir = base_dir
        self._embedder = embedder  # default: the process-wide one for embedding_model
        #: the cross-fitted copies: (training texts' hashes, each one's fold, the estimators
        #: fitted without each fold); None when not cross-fitted (too few questions, or a
        #: file written before cross-fitting)
        self.folds: tuple[np.ndarray, np.ndarray, list] | None = None

    @property
    def embedder(self):
        return self._embedder or shared_embedder(self.embedding_model, self.batch_size,
                                                 str(self.base_dir))

    @property
    def cross_fitted(self) -> bool:
        """Whether a training question is classified by the fold copy that did not see it."""
        return self.folds is not None

    @property
    def labels(self) -> list[str]:
        return [str(c) for c in self.estimator.classes_]

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.encode(list(texts))

    def fit(self, texts: list[str], categories: list[str]) -> "LearnedCategoryClassifier":
        from sklearn.base import clone

        x, y = self.embed(texts), np.asarray(categories)
        hashes = text_hash(list(texts))
        fold = (hashes % FOLDS).astype(np.int64)
        cross = all(len(set(y[fold != f])) > 1 for f in range(FOLDS))
        with one_thread(), progress.bar(total=1 + FOLDS * cross, desc="training the router",
                                        unit="fit", when=len(y) >= 2000) as bar:
            self.estimator.fit(x, y)
            bar.update()
            self.folds = None
            if cross:
                fitted = []
                for f in range(FOLDS):
                    fitted.append(clone(self.estimator).fit(x[fold != f], y[fold != f]))
                    bar.update()
                self.folds = (hashes, fold, fitted)
        return self

    def _proba(self, texts: list[str]) -> np.ndarray:
        """Class probabilities (columns: ``labels``); a training text's from the copy fitted
        without it."""
        x = self.embed(texts)
        with one_thread():
            p = self.estimator.predict_proba(x)
            if self.folds is None:
                return p
            hashes, fold, estimators = self.folds
            order = np.argsort(hashes)
            h = text_hash(list(texts))
            at = np.minimum(np.searchsorted(hashes[order], h), len(order) - 1)
            seen = hashes[order][at] == h
            for f, est in enumerate(estimators):
                mine = np.flatnonzero(seen & (fold[order][at] == f))
                if len(mine):
                    col = [list(est.classes_).index(c) if c in est.classes_ else -1
                           for c in self.estimator.classes_]
                    q = est.predict_proba(x[mine])
                    p[mine] = np.where(np.array(col) >= 0, q[:, np.maximum(col, 0)], 0.0)
            return p

    def predict(self, texts: list[str]) -> list[str]:
        labels = self.labels
        return [labels[i] for i in np.argmax(self._proba(texts), axis=1)]

    def predict_proba(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        return self.labels, self._proba(texts)

    def save(self, path: str | Path) -> None:
        joblib.dump({"format": FORMAT, "estimator": self.estimator, "labels": self.labels,
                     "folds": self.folds,
                     "embedding_model": self.embedding_model,
                     "embedding_tag": static_tag(self.embedding_model, self.base_dir)}, path)

    @classmethod
    def load(cls, path: str | Path, base_dir: str = ".") -> "LearnedCategoryClassifier":
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: router file not found (train one with coe train-router)")
        try:
            blob = joblib.load(p)
        except Exception as e:  # pickle/joblib raise many types for a foreign file
            raise ConfigError(f"{p}: not a coe router file ({type(e).__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ConfigError(f"{p}: not a coe router file (expected {FORMAT})")
        trained = blob.get("embedding_tag")
        here = static_tag(blob["embedding_model"], base_dir) if trained is not None else None
        if trained != here:
            raise ConfigError(f"{p}: trained on static embeddings {trained}, but this machine "
                              f"distils {here} (another "
                              f"model2vec version or source model): retrain it with coe "
                              f"train-router")
        clf = cls(blob["estimator"], blob["embedding_model"], base_dir=base_dir)
        clf.folds = blob.get("folds")
        return clf

    def check_categories(self, config, source: str) -> None:
        """Every category the classifier predicts must be a category of the pool."""
        known = set(config.category_names())
        unknown = [c for c in self.labels if c not in known]
        if unknown:
            raise ConfigError(f"{source}: router was trained on categories the pool does not "
                              f"have: {', '.join(sorted(unknown))}")


def load_for_pool(config) -> LearnedCategoryClassifier:
    path = config.resolve_path(config.router.model_file)
    clf = LearnedCategoryClassifier.load(path, base_dir=str(config.base_dir))
    clf.check_categories(config, str(path))
    return clf


@dataclass
class TrainingReport:
    labels: list[str]
    n_train: int
    n_test: int
    accuracy: float
    confusion: np.ndarray  # rows: true category, columns: predicted

    def table(self) -> str:
        short = [lab[:6] for lab in self.labels]
        width = max(len(lab) for lab in self.labels)
        lines = [f"held-out accuracy: {self.accuracy:.1%} (train {self.n_train}, test {self.n_test})",
                 "confusion matrix (rows: true, columns: predicted):",
                 " " * (width + 1) + " ".join(f"{s:>6}" for s in short)]
        for lab, row in zip(self.labels, self.confusion):
            lines.append(f"{lab:<{width}} " + " ".join(f"{int(v):>6}" for v in row))
        return "\n".join(lines)


def train_category_router(train, test=None, test_fraction: float = 0.2, seed: int = 0,
                          estimator: str = "logreg", embedding_model: str = DEFAULT_MODEL,
                          base_dir: str = ".") -> tuple[LearnedCategoryClassifier, TrainingReport]:
    """Fit on questions with a ``category``; report accuracy and confusion on held-out ones
    (``test``, or a seeded ``test_fraction`` of ``train``). The returned classifier is then
    refitted on every labelled question."""
    from sklearn.metrics import confusion_matrix

    labelled = [q for q in train if q.category]
    if len({q.category for q in labelled}) < 2:
        raise ConfigError("training a category router needs questions of at least 2 categories")
    if test is None:
        order = list(labelled)
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(order) * test_fraction))
        test, fit_on = order[:cut], order[cut:]
    else:
        test, fit_on = [q for q in test if q.category], labelled
    clf = LearnedCategoryClassifier(make_estimator(estimator), embedding_model, base_dir=base_dir)
    clf.fit([q.question for q in fit_on], [q.category for q in fit_on])
    pred = clf.predict([q.question for q in test])
    gold = [q.category for q in test]
    labels = sorted(set(gold) | set(clf.labels))
    report = TrainingReport(labels, len(fit_on), len(test),
                            float(np.mean([p == g for p, g in zip(pred, gold)])),
                            confusion_matrix(gold, pred, labels=labels))
    if fit_on is not labelled:
        clf = LearnedCategoryClassifier(make_estimator(estimator), embedding_model, base_dir=base_dir)
        clf.fit([q.question for q in labelled], [q.category for q in labelled])
    return clf, report
