"""The unit of work: a ``Request``, one conversation to answer.

A request holds the conversation (``messages``: system, developer, user, assistant and tool
turns, as the OpenAI chat API has them), what the caller asks of the generation
(``sampling``: temperature, top_p, max_tokens, stop, seed, n, logprobs, penalties), ``tools`` /
``tool_choice``, ``response_format``, and what the batch paths know about it as a question:
its ``id``, ``choices``, gold ``answer``, ``category`` and answer ``kind``.

A line of a question file is the simplest request: one user message, ``question``. Given alone,
``question`` (with optional ``instructions``, a system message) *is* the conversation; given
with ``messages`` it must be the text of the last user message. Either way, after validation
both are there: ``messages`` is the conversation, ``question`` the last user turn's text
(what routers read first), ``instructions`` the system and developer turns' text.

``Question`` is the same class (a question is a request with one user turn).

This module imports nothing from ``coe``.
"""

from __future__ import annotations

import json
import string
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LETTERS = string.ascii_uppercase

AnswerKind = Literal["mc", "number", "text", "free"]
Role = Literal["system", "developer", "user", "assistant", "tool"]

#: the most tokens one generation may ask for (and the longest llama.cpp context): the
#: longest trained context of open models (Qwen2.5-1M); beyond it a typo, not a setting
MAX_TOKENS = 1 << 20
#: the highest sampling temperature (the OpenAI API's range; beyond it, noise)
MAX_TEMPERATURE = 2.0
#: the most choices one request may ask for (``n``)
MAX_N = 16
#: the most alternatives per token a request may ask for (``top_logprobs``: the OpenAI API's)
MAX_TOP_LOGPROBS = 20
#: a stop string: an empty one would end every generation before its first token
StopString = Annotated[str, Field(min_length=1)]


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


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- the conversation ---------------------------------------------------------------------

class FunctionCall(_Frozen):
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as the model wrote it


class ToolCall(_Frozen):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Frozen):
    """One turn. ``content`` is text (a list of text parts is joined at the service's door);
    an assistant turn may carry ``tool_calls`` instead, and a ``tool`` turn answers one of them
    (``tool_call_id``)."""

    role: Role
    content: str | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return self.content or ""

    @property
    def plain(self) -> bool:
        """Only a role and text: what a completion prompt or an old cache key can hold."""
        return self.name is None and self.tool_calls is None and self.tool_call_id is None

    def to_openai(self) -> dict[str, Any]:
        """The message as the OpenAI chat API (and llama.cpp's chat templates) take it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDef(_Frozen):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Frozen):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Frozen):
    name: str = Field(min_length=1)


class NamedToolChoice(_Frozen):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchema(_Frozen):
    name: str = Field("response", min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ResponseFormat(_Frozen):
    """``text`` (the default), ``json_object`` (any JSON object) or ``json_schema`` (JSON that
    validates against ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema")
        return self

    @property
    def wants_json(self) -> bool:
        return self.type != "text"

    def key(self) -> str:
        """Canonical JSON, for cache keys."""
        return json.dumps(self.model_dump(by_alias=True, exclude_none=True), sort_keys=True)


# -- generation options -------------------------------------------------------------------

class Sampling(BaseModel):
    """An expert's sampling (the yaml's ``sampling:``), every field set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int = Field(256, gt=0, le=MAX_TOKENS)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[StopString] = Field(default_factory=list)
    seed: int | None = 0
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    #: fields added after cache keys were first written: left out of a key while at default,
    #: so a generation cached before they existed keeps its key
    LATE_FIELDS: ClassVar[tuple[str, ...]] = ("presence_penalty", "frequency_penalty")

    def key_fields(self) -> dict[str, Any]:
        d = self.model_dump()
        for f in self.LATE_FIELDS:
            if d[f] == 0.0:
                del d[f]
        return d

    @property
    def deterministic(self) -> bool:
        """Whether the same request always gives the same text: greedy, or seeded."""
        return self.temperature == 0.0 or self.seed is not None


class GenerationOptions(BaseModel):
    """What one request asks of its generations (a served request's sampling fields, a question
    file's ``sampling``). Unset fields keep the expert's (``apply``); ``n``, ``logprobs`` and
    ``top_logprobs`` are the request's own."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    max_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: list[StopString] | None = Field(None, max_length=4)
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    #: a completion's prompt given back before its answer, with the prompt's logprobs
    echo: bool = False

    REQUEST_ONLY: ClassVar[tuple[str, ...]] = ("n", "logprobs", "top_logprobs", "echo")

    def apply(self, sampling: Sampling) -> Sampling:
        """``sampling`` with this request's sampling fields over it. A request that asks for
        a temperature above 0 and no ``seed`` asks for a fresh sample: the expert's own seed
        is dropped, so the answer is not reproducible (and never read from the cache)."""
        fields = self.model_dump(exclude_unset=True, exclude_none=True,
                                 exclude=set(self.REQUEST_ONLY))
        if fields.get("temperature", 0.0) > 0.0 and "seed" not in fields:
            fields["seed"] = None
        return sampling.model_copy(update=fields)

    @property
    def wants_logprobs(self) -> int | None:
        """None, or how many alternatives per token (0: only the sampled token's)."""
        if not self.logprobs and self.top_logprobs is None:
            return None
        return self.top_logprobs or 0


#: the name of 0.1 (a served request's sampling fields)
SamplingOverride = GenerationOptions


# -- the request ----------------------------------------------------------------------------

class Request(BaseModel):
    """One conversation to answer (see the module doc)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    messages: list[Message] = Field(default_factory=list)
    instructions: str | None = None
    choices: list[str] | None = None
    category: str | None = None
    answer: str | None = None
    kind: AnswerKind | None = None
    meta: dict[str, Any] = Field(default_factory=dict)
    sampling: GenerationOptions | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="before")
    @classmethod
    def _question_from_messages(cls, data: Any) -> Any:
        """A request given as messages only: ``question`` is its last user turn's text."""
        if isinstance(data, dict) and data.get("messages") and "question" not in data:
            user = [m for m in data["messages"] if _role(m) == "user"]
            if user:
                data = {**data, "question": _content(user[-1])}
        return data

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

    @model_validator(mode="after")
    def _one_conversation(self) -> "Request":
        if not self.messages:
            turns = [Message(role="user", content=self.question)]
            if self.instructions and self.instructions.strip():
                turns.insert(0, Message(role="system", content=self.instructions))
            self.messages = turns
            return self
        users = [m for m in self.messages if m.role == "user"]
        if not users or users[-1].text != self.question:
            raise ValueError("question must be the text of the last user message "
                             "(give messages alone)")
        system = [m.text for m in self.messages if m.role in ("system", "developer") and m.text]
        if self.instructions is not None and self.instructions != "\n\n".join(system):
            raise ValueError("instructions must not be given with messages (put a system "
                             "message in messages)")
        self.instructions = "\n\n".join(system) or None
        return self

    # -- reading it ------------------------------------------------------------------------
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

    @property
    def single_turn(self) -> bool:
        """One user message after system messages at most: the question-file case."""
        turns = [m for m in self.messages if m.role not in ("system", "developer")]
        return len(turns) == 1 and turns[0] is self.messages[-1] and turns[0].role == "user" \
            and all(m.plain for m in self.messages)

    @property
    def before_last_user(self) -> list[Message]:
        """The turns before the last user message (its system turns included)."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "user")
        return self.messages[:last]

    @property
    def after_last_user(self) -> list[Message]:
        """The turns after the last user message (an assistant's tool calls, their results)."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "user")
        return self.messages[last + 1:]

    @property
    def n(self) -> int:
        return self.sampling.n if self.sampling is not None else 1


def _role(m: Any) -> Any:
    return m.role if isinstance(m, Message) else m.get("role") if isinstance(m, dict) else None


def _content(m: Any) -> Any:
    return m.content if isinstance(m, Message) else m.get("content") if isinstance(m, dict) \
        else None


#: a question is a request with one user turn (the name used across the batch paths)
Question = Request
