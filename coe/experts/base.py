"""The backend interface: load the weights, generate every prompt handed over, unload.

A backend knows nothing of routing or aggregation. It receives ``GenRequest``s (a prompt or
chat messages plus sampling) and reports each ``Generation`` through a callback as soon as it
is done, so the executor can store it before the next one starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from coe.config import Sampling


@dataclass(frozen=True)
class GenRequest:
    expert: str
    question_id: str
    sampling: Sampling
    prompt: str | None = None  # completion format
    messages: tuple[tuple[str, str], ...] | None = None  # chat format: (role, content)
    stage: str = "expert"  # what the generation is for: expert, aggregate, skills...

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in (self.messages or ())]


class Generation(BaseModel):
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None
    # An answer recorded with the text (a replay of a scored run): used as-is, not re-extracted.
    recorded_answer: str | None = None
    has_recorded_answer: bool = False


OnResult = Callable[[int, Generation], None]


class Backend(ABC):
    """One set of weights (or one endpoint), shared by every expert with the same load key."""

    #: whether generations should go to the response cache (a replay is already a record)
    cacheable = True
    #: whether the response depends on the question id, not only on the prompt (a replay)
    keyed_by_question = False

    def __init__(self, config, base_dir=None):
        self.config = config
        self.base_dir = base_dir

    @property
    def label(self) -> str:
        return f"{self.config.backend}:{self.config.model}"

    def fingerprint(self) -> str:
        """Identifies the weights or endpoint for the response cache."""
        return self.label

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def generate(self, requests: list[GenRequest], on_result: OnResult) -> None:
        """Generate every request; call ``on_result(i, generation)`` as each one finishes.

        A request that fails on its own is reported with ``Generation.error`` set; an
        exception means the backend itself broke and the remaining requests are lost."""

    @abstractmethod
    def unload(self) -> None: ...
