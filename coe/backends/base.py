"""The backend interface: load the weights, generate every prompt handed over, unload.

A backend knows nothing of routing or aggregation. It receives ``GenRequest``s (a prompt or
chat messages plus sampling) and reports each ``Generation`` through a callback as soon as it
is done, so the executor can store it before the next one starts.

Each backend class declares:

- ``capabilities``: what it can do (``Capabilities``: chat, completion, streaming, tools, JSON
  response formats, logprobs, echo; whether it only replays a record; whether it needs a GPU;
  whether it holds weights in this process). The pipeline, the service and the evaluation read
  this declaration (through ``capabilities_for(config)``, where a yaml option may narrow it) and
  refuse in one line what no recruited expert can honour; nobody probes a backend for it;

- ``config_model``: its yaml options, a subclass of ``coe.core.config.ExpertConfig`` whose
  ``backend`` field is the name it is registered under (``coe.core.registry.BACKENDS``), and whose
  ``load_key`` includes every option that changes the loaded model (experts with equal load
  keys share one backend instance and one load);
- ``check(config, base_dir)``: what can be verified without loading anything (the model file
  exists, the API key variable is set), for ``coe experts --check`` and the pre-flight;
  ``reads(config, base_dir)``: the local files it reads, which no command may write over;
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
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Coroutine

from coe.core.config import GB, ExpertConfig, Resources
from coe.core.types import Generation, GenRequest, OnResult, OnToken, Truncation

__all__ = ["Backend", "Capabilities", "Generation", "GenRequest", "OnResult", "OnToken",
           "run_sync", "truncation"]


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do: a declaration, read by callers, never probed."""

    #: takes a conversation (rendered by the model's chat template)
    chat: bool = True
    #: takes a raw text prompt
    completion: bool = True
    #: ``generate`` takes ``on_token`` and reports each piece of text as it is decoded
    stream: bool = False
    #: honours ``tools`` and ``tool_choice``, returning ``tool_calls``
    tools: bool = False
    #: honours ``response_format`` ``json_object`` and ``json_schema`` (constrained decoding,
    #: or the API's own)
    json_schema: bool = False
    #: returns token log-probabilities (``logprobs``, ``top_logprobs``)
    logprobs: bool = False
    #: a completion may give its prompt back with the prompt's log-probabilities (``echo``)
    echo: bool = False
    #: answers from a record, by question id: the prompt is not read, nothing is generated
    #: (so nothing is cached, and sampling cannot give a new answer)
    replay_only: bool = False
    #: the model runs on a GPU
    gpu: bool = False
    #: a loaded instance holds weights in this process's memory (an endpoint does not): only
    #: those count against an executor's residency limits
    holds_weights: bool = True
    #: generations go to the response cache (a replay's need not: it is a record already)
    cacheable: bool = True

    @property
    def keyed_by_question(self) -> bool:
        """Whether the response depends on the question id, not only on the prompt."""
        return self.replay_only

    @property
    def uses_prompt(self) -> bool:
        """Whether the response depends on the prompt at all: a caller with many requests may
        send a replay none (``prompt`` and ``messages`` None) instead of building one each."""
        return not self.replay_only

    def lacks(self, request: GenRequest) -> str | None:
        """What of ``request`` this backend cannot honour, as "tools" or "response_format
        json_schema" (None: everything)."""
        if request.tools and (not self.tools or request.messages is None):
            return "tools"  # a completion (a prompt, not a conversation) has no tools
        if (request.response_format is not None and request.response_format.wants_json
                and not self.json_schema):
            return f"response_format {request.response_format.type}"
        if request.logprobs is not None and not self.logprobs:
            return "logprobs"
        if request.echo and not self.echo:
            return "echo"
        if request.messages is not None and not self.chat:
            return "chat messages"
        return None


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


#: the 0.1 declarations (class attributes) and the capability each became
LEGACY = {"holds_weights": "holds_weights", "can_stream": "stream", "cacheable": "cacheable",
          "keyed_by_question": "replay_only", "uses_prompt": "replay_only"}


class Backend(ABC):
    """One set of weights (or one endpoint), shared by every expert with the same load key."""

    def __init_subclass__(cls, **kwargs) -> None:
        """A plugin written for 0.1 declared ``holds_weights = False`` (and the like) as class
        attributes: they become its ``capabilities``, with a deprecation warning, for one
        release."""
        super().__init_subclass__(**kwargs)
        old = {k: v for k, v in cls.__dict__.items() if k in LEGACY}
        if not old or "capabilities" in cls.__dict__:
            return
        import warnings

        warnings.warn(f"{cls.__name__}: {', '.join(old)} are the 0.1 declarations of a "
                      "backend; declare capabilities = Capabilities(...) instead",
                      DeprecationWarning, stacklevel=2)
        fields = {LEGACY[k]: bool(v) for k, v in old.items()
                  if k not in ("keyed_by_question", "uses_prompt")}
        if old.get("keyed_by_question") or old.get("uses_prompt") is False:
            fields["replay_only"] = True
        cls.capabilities = dataclasses.replace(cls.capabilities, **fields)

    #: the yaml options of this backend's experts
    config_model: ClassVar[type[ExpertConfig]] = ExpertConfig
    #: what every instance can do (see ``Capabilities``); ``capabilities_for`` narrows it for
    #: one expert's options. The executor passes ``on_token`` only to backends that ``stream``.
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, config, base_dir=None):
        self.config = config
        self.base_dir = base_dir

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """What an expert with these yaml options can do: the class's declaration unless an
        option changes it."""
        return cls.capabilities

    @property
    def can(self) -> Capabilities:
        """This instance's capabilities (its expert's)."""
        return self.capabilities_for(self.config)

    @classmethod
    def check(cls, config, base_dir) -> None:
        """Raise a ``CoeError`` for what would make ``load`` fail, without loading."""

    @classmethod
    def reads(cls, config, base_dir) -> list[Path]:
        """The local files an expert with these options reads (its weights, its record), so
        that no command writes over them; found without loading or opening anything."""
        return []

    @property
    def label(self) -> str:
        return f"{self.config.backend}:{self.config.model}"

    def memory_bytes(self) -> int:
        """The bytes this backend's loaded weights hold, for the executor's memory budget: the
        yaml's ``memory_gb`` when set, else 0 for an endpoint, else ``estimate_bytes()``."""
        if self.config.memory_gb is not None:
            return int(self.config.memory_gb * GB)
        return self.estimate_bytes() if self.can.holds_weights else 0

    def default_resources(self) -> Resources:
        """What the model's process needs unless the yaml says otherwise: a CPU for a model
        holding weights, none for an endpoint or a replay. Backends override it."""
        return Resources(num_cpus=1 if self.can.holds_weights else 0, num_gpus=0)

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
