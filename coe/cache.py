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

from coe.errors import StorageError
from coe.store import KeyValueStore, cache_dir
from coe.types import Generation, GenRequest


def default_cache_path() -> Path:
    return cache_dir() / "responses.sqlite"


def cache_key(fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
    """Identical prompts to identical weights with identical sampling share a key (and so a
    generation), unless the backend answers per question id (``by_question``)."""
    payload = {
        "question": request.question_id if by_question else None,
        "model": fingerprint,
        "prompt": request.prompt,
        "messages": request.messages,
        "sampling": request.sampling.model_dump(),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


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
