"""The response cache: every finished generation is stored at once, keyed by the model
fingerprint, the full prompt and the sampling parameters.

This is also what makes a killed run resumable: a rerun finds every generation that finished
before the kill and makes only the missing ones. Errors are never cached.

A cache that cannot be written is a ``StorageError`` naming its file: when it is opened, before
any model loads, and on the ``put`` that finds the disk full, which stops the run (the
executor lets it through): generating on with nowhere to keep the results would lose them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from coe.core.errors import StorageError
from coe.core.types import Generation, GenRequest
from coe.io.store import KeyValueStore, cache_dir


def default_cache_path() -> Path:
    return cache_dir() / "responses.sqlite"


def cache_key(fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
    """Identical prompts to identical weights with identical sampling share a key (and so a
    generation), unless the backend answers per question id (``by_question``)."""
    return CacheKeys()(fingerprint, request, by_question)


class CacheKeys:
    """``cache_key`` for the many requests of one plan. The key is the SHA-256 of the JSON of
    ``{messages, model, prompt, question, sampling}`` (keys sorted, as ``json.dumps`` with
    ``sort_keys`` writes it); that JSON is assembled here from its parts, and each distinct
    ``Sampling`` object (most requests of an expert share one) is serialised once, not per
    request: the same bytes, a third of the time. ``tests/test_scale.py`` checks the keys
    against the plain ``json.dumps`` of the payload."""

    def __init__(self) -> None:
        self._sampling: dict[int, tuple[object, str]] = {}  # id -> (the object, its JSON)

    def _sampling_json(self, sampling) -> str:
        hit = self._sampling.get(id(sampling))
        if hit is None or hit[0] is not sampling:  # keep the object: its id stays its own
            hit = self._sampling[id(sampling)] = (
                sampling, json.dumps(sampling.model_dump(), sort_keys=True, ensure_ascii=False))
        return hit[1]

    def __call__(self, fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
        blob = (f'{{"messages": {_json(request.messages)}, "model": {_json(fingerprint)}, '
                f'"prompt": {_json(request.prompt)}, '
                f'"question": {_json(request.question_id if by_question else None)}, '
                f'"sampling": {self._sampling_json(request.sampling)}}}')
        return hashlib.sha256(blob.encode()).hexdigest()


_dumps = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(x, ensure_ascii=False)


def _json(value) -> str:
    return "null" if value is None else _dumps(value)


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._store = KeyValueStore(self.path, "responses", what="response cache")

    def get_many(self, keys: list[str]) -> dict[str, Generation]:
        return {k: Generation.model_validate_json(v) for k, v in self._store.get_many(keys).items()}

    def put(self, key: str, gen: Generation) -> None:
        if gen.error is not None:
            return
        try:
            self._store.put(key, gen.model_copy(update={"cached": False}).model_dump_json())
        except StorageError as e:
            raise StorageError(f"{e}; the run stops here: the generations stored before are "
                               f"kept, rerun with --resume once it can be written") from None

    def __len__(self) -> int:
        return len(self._store)

    def close(self) -> None:
        self._store.close()
