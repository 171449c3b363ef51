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

from coe.core.config import PoolConfig
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
    ``sort_keys`` writes it), plus, only when the request asks for them, ``echo``,
    ``logprobs``, ``response_format``, ``sample``, ``tool_choice`` and ``tools``: a plain
    request keeps the key it had before those existed. A conversation of plain turns is a list
    of ``[role, text]`` pairs (as before turns could carry tool calls); one with a tool call
    or result is a list of OpenAI message objects.

    That JSON is assembled here from its parts, and each distinct ``Sampling`` object (most
    requests of an expert share one) is serialised once, not per request: the same bytes, a
    third of the time. ``tests/apps/eval/test_bounded_memory.py`` checks the keys against the
    plain ``json.dumps`` of the payload."""

    def __init__(self) -> None:
        self._sampling: dict[int, tuple[object, str]] = {}  # id -> (the object, its JSON)

    def _sampling_json(self, sampling) -> str:
        hit = self._sampling.get(id(sampling))
        if hit is None or hit[0] is not sampling:  # keep the object: its id stays its own
            hit = self._sampling[id(sampling)] = (
                sampling, json.dumps(sampling.key_fields(), sort_keys=True, ensure_ascii=False))
        return hit[1]

    def __call__(self, fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
        blob = (f'{{"messages": {_json(messages_key(request.messages))}, '
                f'"model": {_json(fingerprint)}, '
                f'"prompt": {_json(request.prompt)}, '
                f'"question": {_json(request.question_id if by_question else None)}, '
                f'"sampling": {self._sampling_json(request.sampling)}'
                f'{"" if request.plain else extras_key(request)}}}')
        return hashlib.sha256(blob.encode()).hexdigest()


def messages_key(messages) -> list | None:
    """The conversation as the key holds it (see ``CacheKeys``)."""
    if messages is None:
        return None
    if all(m.plain for m in messages):
        return [[m.role, m.content] for m in messages]
    return [m.to_openai() for m in messages]


def extras_key(request: GenRequest) -> str:
    """The key's fields after ``sampling``, for a request that asks more than text: each as
    ``, "name": value`` in sorted order."""
    fields = {
        "echo": request.echo or None,
        "logprobs": request.logprobs,
        "response_format": (request.response_format.model_dump(by_alias=True, exclude_none=True)
                            if request.response_format is not None else None),
        "sample": request.sample or None,
        "tool_choice": (request.tool_choice if isinstance(request.tool_choice, str) or
                        request.tool_choice is None else request.tool_choice.model_dump()),
        "tools": ([t.model_dump(exclude_none=True) for t in request.tools]
                  if request.tools else None),
    }
    return "".join(f', "{k}": {json.dumps(v, sort_keys=True, ensure_ascii=False)}'
                   for k, v in fields.items() if v is not None)


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


def cache_path(config: PoolConfig, cache: bool | str | Path | ResponseCache) -> Path | None:
    """The file of the response cache ``cache`` names (None for none)."""
    if cache is False:
        return None
    if cache is True:
        return config.resolve_path(config.cache) if config.cache else default_cache_path()
    if isinstance(cache, (str, Path)):
        return Path(cache)
    return cache.path


def open_cache(config: PoolConfig, cache: bool | str | Path | ResponseCache) -> ResponseCache | None:
    """The response cache ``cache`` names: True for the yaml's (or the default) file, a path,
    an open cache, or False for none."""
    if cache is False:
        return None
    if isinstance(cache, ResponseCache):
        return cache
    return ResponseCache(cache_path(config, cache))
