"""The values that flow through coe, in the order they flow:

    Question -> Route (Recruit) -> GenRequest -> Generation -> ExpertResponse -> FinalAnswer
             -> QuestionResult

Every stage (routers, the executor, backends, aggregators, evaluation, the CLI) speaks in these
types, so they live here, in one module that imports nothing else from ``coe``: any module may
import them without creating a cycle. Behaviour lives elsewhere (answer extraction in
``coe.text.answers``, prompts in ``coe.text.prompts``, file formats in ``coe.io.questions``).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LETTERS = string.ascii_uppercase

AnswerKind = Literal["mc", "number", "text"]
Truncation = Literal["max_tokens", "context"]


def parse_number(text: str) -> Decimal | None:
    """A finite decimal from text such as ``"1,200"``, ``"$3.50"`` or ``"45%"``, else None."""
    t = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if t.endswith("%"):
        t = t[:-1]
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


# -- input ---------------------------------------------------------------------------------

class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    choices: list[str] | None = None
    category: str | None = None
    answer: str | None = None
    kind: AnswerKind | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    # What one caller asks of this question only (a served request's system message and
    # sampling fields): extra instructions for every expert, and sampling that overrides the
    # yaml's for the experts' and the aggregator's generations.
    instructions: str | None = None
    sampling: "SamplingOverride | None" = None

    @field_validator("id", "answer", mode="before")
    @classmethod
    def _scalar_to_str(cls, v):
        if isinstance(v, bool):
            raise ValueError("must be a string or number")
        if isinstance(v, (int, float)):
            return str(v)
        return v

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("choices")
    @classmethod
    def _choices(cls, v):
        if v is not None and not 1 <= len(v) <= len(LETTERS):
            raise ValueError(f"needs 1 to {len(LETTERS)} choices")
        return v

    @property
    def answer_kind(self) -> AnswerKind:
        """Multiple choice when there are choices; a number when the gold answer is one."""
        if self.kind:
            return self.kind
        if self.choices:
            return "mc"
        if self.answer is not None and parse_number(self.answer) is not None:
            return "number"
        return "text"


# -- routing -------------------------------------------------------------------------------

class Recruit(BaseModel):
    name: str
    weight: float = 1.0


class Route(BaseModel):
    """Which experts answer one question, with weights, and why."""

    question_id: str
    experts: list[Recruit]
    category: str | None = None
    skills: list[str] = Field(default_factory=list)
    confidence: float | None = None
    reason: str = ""
    aggregator: str | None = None  # an aggregator expert suggested by the router, if any
    failed: dict[str, str] = Field(default_factory=dict)  # expert -> error, filled after running

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.experts]


# -- generation ----------------------------------------------------------------------------

#: the most tokens one generation may ask for (and the longest llama.cpp context): the
#: longest trained context of open models (Qwen2.5-1M); beyond it a typo, not a setting
MAX_TOKENS = 1 << 20
#: the highest sampling temperature (the OpenAI API's range; beyond it, noise)
MAX_TEMPERATURE = 2.0
#: a stop string: an empty one would end every generation before its first token
StopString = Annotated[str, Field(min_length=1)]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int = Field(256, gt=0, le=MAX_TOKENS)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[StopString] = Field(default_factory=list)
    seed: int | None = 0


class SamplingOverride(BaseModel):
    """Sampling fields one question (a served request) sets for itself; unset ones keep the
    expert's."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[StopString] | None = Field(None, max_length=4)
    seed: int | None = None

    def apply(self, sampling: Sampling) -> Sampling:
        return sampling.model_copy(update=self.model_dump(exclude_unset=True, exclude_none=True))


@dataclass(frozen=True)
class GenRequest:
    """One generation one expert must make: a prompt or chat messages plus sampling."""

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
    finish_reason: str | None = None  # "stop", "length" (cut at max_tokens), when known
    # Why a "length" generation was cut, when the backend can tell: "max_tokens" (the answer
    # used all it was allowed) or "context" (prompt plus answer filled the context window).
    truncated_by: Truncation | None = None
    # An answer recorded with the text (a replay of a scored run): used as-is, not re-extracted.
    recorded_answer: str | None = None
    has_recorded_answer: bool = False


#: ``on_result(i, generation)``: a backend reports request ``i`` as soon as it is done
OnResult = Callable[[int, Generation], None]
#: ``on_token(i, text)``: a streaming backend reports each piece of request ``i``'s text as it
#: is decoded (before ``on_result`` reports the whole generation)
OnToken = Callable[[int, str], None]


# -- answers -------------------------------------------------------------------------------

class ExpertResponse(BaseModel):
    expert: str
    text: str = ""
    answer: str | None = None  # normalised final answer extracted from text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None
    finish_reason: str | None = None
    # The answer was cut off before it ended (finish_reason "length"): it is still graded, but
    # its final answer may be missing or wrong. ``truncated_by`` says why, when known.
    truncated: bool = False
    truncated_by: Truncation | None = None


class FinalAnswer(BaseModel):
    answer: str | None
    aggregator: str
    confidence: float = 0.0
    votes: dict[str, int] = Field(default_factory=dict)
    response: ExpertResponse | None = None  # the llm aggregator's own generation
    note: str = ""


class QuestionResult(BaseModel):
    """One question's outcome: one JSONL line of ``coe run``'s output."""

    id: str
    question: str
    choices: list[str] | None = None  # as asked: ``--resume`` reruns a question asked otherwise
    category: str | None = None
    gold: str | None = None
    route: Route
    responses: list[ExpertResponse]
    final_answer: str | None
    aggregator: str
    confidence: float
    votes: dict[str, int] = Field(default_factory=dict)
    aggregator_response: ExpertResponse | None = None
    correct: bool | None = None
    note: str = ""


Question.model_rebuild()  # its ``sampling`` refers to SamplingOverride, defined below it
