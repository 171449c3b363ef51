"""The values that flow through coe, in the order they flow:

    Request -> Route (Recruit) -> GenRequest -> Generation -> ExpertResponse -> FinalAnswer
            -> QuestionResult

The request (a conversation, ``coe.core.request``) is the unit of work. Every stage (routers,
the executor, backends, aggregators, evaluation, the apps) speaks in these types, so they live
here, in modules that import nothing else from ``coe``: any module may import them without
creating a cycle. Behaviour lives elsewhere (answer extraction in ``coe.text.answers``, prompts
in ``coe.text.prompts``, file formats in ``coe.io.questions``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field

from coe.core.request import (
    LETTERS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    AnswerKind,
    FunctionCall,
    GenerationOptions,
    Message,
    Question,
    Request,
    ResponseFormat,
    Sampling,
    SamplingOverride,
    StopString,
    Tool,
    ToolCall,
    ToolChoice,
    parse_number,
)

__all__ = ["LETTERS", "MAX_TEMPERATURE", "MAX_TOKENS", "AnswerKind", "ExpertResponse",
           "FinalAnswer", "FunctionCall", "GenRequest", "Generation", "GenerationOptions",
           "Message", "OnResult", "OnToken", "Question", "QuestionResult", "Recruit", "Request",
           "ResponseFormat", "Route", "Sampling", "SamplingOverride", "StopString", "Tool",
           "ToolCall", "ToolChoice", "Truncation", "parse_number"]

Truncation = Literal["max_tokens", "context"]


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

def _as_message(m) -> Message:
    return m if isinstance(m, Message) else Message(role=m[0], content=m[1])


@dataclass(frozen=True)
class GenRequest:
    """One generation one expert must make: a prompt (completion format) or a conversation
    (chat format), its sampling, and what else the caller asks of it: ``tools`` and
    ``tool_choice``, a ``response_format``, token ``logprobs`` (None: none; k: the sampled
    token's and the k likeliest others'), ``echo`` (a completion's prompt given back, with its
    logprobs) and ``sample``, the index of one of several independent samples of the same
    request (``n``: each is generated, and cached, on its own)."""

    expert: str
    question_id: str
    sampling: Sampling
    prompt: str | None = None  # completion format
    messages: tuple[Message, ...] | None = None  # chat format (pairs (role, text) accepted)
    stage: str = "expert"  # what the generation is for: expert, aggregate, skills...
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    logprobs: int | None = None
    echo: bool = False
    sample: int = 0

    def __post_init__(self) -> None:
        if self.messages is not None and not all(isinstance(m, Message) for m in self.messages):
            object.__setattr__(self, "messages", tuple(_as_message(m) for m in self.messages))
        if self.tools is not None and not isinstance(self.tools, tuple):
            object.__setattr__(self, "tools", tuple(self.tools))

    def chat(self) -> list[dict[str, Any]]:
        """The conversation as the OpenAI chat API takes it."""
        return [m.to_openai() for m in self.messages or ()]

    @property
    def plain(self) -> bool:
        """Nothing asked beyond text: no tools, response format, logprobs, echo or sample."""
        return (self.tools is None and self.tool_choice is None and self.response_format is None
                and self.logprobs is None and not self.echo and self.sample == 0)


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
    #: the tool calls the model made instead of (or besides) text, in the OpenAI shape
    tool_calls: list[ToolCall] | None = None
    #: token log-probabilities, as the OpenAI API returns them for this kind of request
    #: (chat: ``{"content": [...]}``; completions: ``{"tokens", "token_logprobs",
    #: "top_logprobs", "text_offset"}``)
    logprobs: dict[str, Any] | None = None


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
    tool_calls: list[ToolCall] | None = None
    logprobs: dict[str, Any] | None = None


class FinalAnswer(BaseModel):
    answer: str | None
    aggregator: str
    confidence: float = 0.0
    votes: dict[str, int] = Field(default_factory=dict)
    response: ExpertResponse | None = None  # the llm aggregator's own generation
    note: str = ""
    #: free text: the experts whose answers say the same thing, the winning cluster first
    clusters: list[list[str]] = Field(default_factory=list)


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
    #: free text: the experts whose answers say the same thing, the winning cluster first
    clusters: list[list[str]] = Field(default_factory=list)

