"""The backend interface: load the weights, generate every prompt handed over, unload.

A backend knows nothing of routing or aggregation. It receives ``GenRequest``s (a prompt or
chat messages plus sampling) and reports each ``Generation`` through a callback as soon as it
is done, so the executor can store it before the next one starts.

Each backend class declares:

- ``config_model``: its yaml options, a subclass of ``coe.core.config.ExpertConfig`` whose
  ``backend`` field is the name it is registered under (``coe.core.registry.BACKENDS``), and whose
  ``load_key`` includes every option that changes the loaded model (experts with equal load
  keys share one backend instance and one load);
- ``check(config, base_dir)``: what can be verified without loading anything (the model file
  exists, the API key variable is set), for ``coe experts --check`` and the pre-flight;
- ``resources()``: what a distributed executor reserves for the process running the model (the
  yaml's ``resources`` over ``default_resources()``), and ``gang_size()``: how many GPUs
  must be reserved together, on one node (vLLM's tensor parallelism);
- ``estimate_bytes()``: the memory its loaded weights would hold, from file sizes only (never
  loading or reading the weights); ``memory_bytes()`` is that or the yaml's ``memory_gb``;
- ``generate`` (blocking) and ``agenerate`` (a coroutine); with ``can_stream``, both take an
  ``on_token`` callback too. The default ``agenerate`` runs
  ``generate`` in a worker thread; a backend that is asynchronous by nature (the OpenAI client)
  implements ``agenerate`` and gets ``generate`` from it through ``run_sync``, which works in
  a plain script, inside a running event loop (Jupyter, a server) and in worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Coroutine

from coe.core.config import GB, ExpertConfig, Resources
from coe.core.types import Generation, GenRequest, OnResult, OnToken, Truncation

__all__ = ["Backend", "Generation", "GenRequest", "OnResult", "OnToken", "run_sync",
           "truncation"]


def truncation(finish_reason: str | None, completion_tokens: int, max_tokens: int,
               prompt_tokens: int = 0, n_ctx: int | None = None) -> Truncation | None:
    """Why a generation that ended with ``finish_reason`` "length" was cut (None: it was
    not). With the context size ``n_ctx``: by the context when the prompt left fewer than
    ``max_tokens`` tokens of room (llama.cpp then lowers max_tokens to that room). Without it:
    by the context when the answer stopped short of ``max_tokens`` (a server cut it)."""
    if finish_reason != "length":
        return None
    if n_ctx is not None:
        return "context" if prompt_tokens + max_tokens > n_ctx else "max_tokens"
    return "context" if completion_tokens < max_tokens else "max_tokens"


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion from synchronous code. In a thread with no running event
    loop (a script, the CLI, an executor's worker) that is ``asyncio.run``; inside a running
    loop (a notebook cell, a server handler calling blocking code) ``asyncio.run`` would raise,
    so the coroutine gets a loop of its own in a helper thread while this thread waits."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="coe-loop") as pool:
        return pool.submit(asyncio.run, coro).result()


class Backend(ABC):
    """One set of weights (or one endpoint), shared by every expert with the same load key."""

    #: the yaml options of this backend's experts
    config_model: ClassVar[type[ExpertConfig]] = ExpertConfig
    #: whether generations should go to the response cache (a replay is already a record)
    cacheable: ClassVar[bool] = True
    #: whether the response depends on the question id, not only on the prompt (a replay)
    keyed_by_question: ClassVar[bool] = False
    #: whether the response depends on the prompt at all: a replay answers by question id
    #: only, so a caller with many requests may send it none (``prompt`` and ``messages``
    #: None) instead of building a prompt per request
    uses_prompt: ClassVar[bool] = True
    #: whether a loaded instance holds weights in this process's memory (an endpoint does not):
    #: only those count against the executor's limit on resident models
    holds_weights: ClassVar[bool] = True
    #: whether ``generate`` and ``agenerate`` accept ``on_token`` and report each piece of text
    #: as it is decoded (a server streams the llm aggregator's answer); the executor passes
    #: ``on_token`` only to backends that declare it
    can_stream: ClassVar[bool] = False

    def __init__(self, config, base_dir=None):
        self.config = config
        self.base_dir = base_dir

    @classmethod
    def check(cls, config, base_dir) -> None:
        """Raise a ``CoeError`` for what would make ``load`` fail, without loading."""

    @property
    def label(self) -> str:
        return f"{self.config.backend}:{self.config.model}"

    def memory_bytes(self) -> int:
        """The bytes this backend's loaded weights hold, for the executor's memory budget: the
        yaml's ``memory_gb`` when set, else 0 for an endpoint, else ``estimate_bytes()``."""
        if self.config.memory_gb is not None:
            return int(self.config.memory_gb * GB)
        return self.estimate_bytes() if self.holds_weights else 0

    def default_resources(self) -> Resources:
        """What the model's process needs unless the yaml says otherwise: a CPU for a model
        holding weights, none for an endpoint or a replay. Backends override it."""
        return Resources(num_cpus=1 if self.holds_weights else 0, num_gpus=0)

    def resources(self) -> Resources:
        """The yaml's ``resources`` over ``default_resources()``."""
        given = self.config.resources.model_dump(exclude_unset=True)
        return self.default_resources().model_copy(update=given)

    def gang_size(self) -> int:
        """How many GPUs (ranks) the model spans, reserved together on one node."""
        return 1

    def estimate_bytes(self) -> int:
        """An estimate of ``memory_bytes`` without loading anything; 0 means unknown (such a
        model counts nothing against a memory budget). Backends override it."""
        return 0

    def fingerprint(self) -> str:
        """Identifies the weights or endpoint for the response cache: by default the load key
        (backend, model and every load option), so experts that differ in a load option
        never share cached generations."""
        return ":".join(map(str, self.config.load_key()))

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def generate(self, requests: list[GenRequest], on_result: OnResult) -> None:
        """Generate every request; call ``on_result(i, generation)`` as each one finishes.

        A request that fails on its own is reported with ``Generation.error`` set; an
        exception means the backend itself broke and the remaining requests are lost."""

    async def agenerate(self, requests: list[GenRequest], on_result: OnResult,
                        **kwargs) -> None:
        """``generate`` for async callers; by default in a worker thread, so the caller's
        event loop keeps running."""
        await asyncio.to_thread(self.generate, requests, on_result, **kwargs)

    @abstractmethod
    def unload(self) -> None: ...
