"""The service's request bodies (the OpenAI API's, with what ``coe`` does not use ignored) and
how one becomes a ``Request``: the whole conversation, with the body's tools, tool choice and
response format.

Fields that change the answer and that ``coe`` cannot honour are refused (422) rather than
silently ignored: ``n`` other than 1, a message with no text. Everything else an OpenAI client
may send (``user``, ``logprobs``, ``frequency_penalty``...) is accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from coe.core.types import (
    MAX_TOKENS,
    AnswerKind,
    Question,
    ResponseFormat,
    SamplingOverride,
    StopString,
    Tool,
    ToolCall,
    ToolChoice,
)
from coe.core.types import Message as ConvMessage

MAX_ID_CHARS = 200


class CoeFields(BaseModel):
    """The ``coe`` extension of a request body (``extra_body={"coe": {...}}`` with the
    ``openai`` client): what a question file would say about the question."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS,
                           description="question id (a replay expert answers by id)")
    choices: list[str] | None = None
    category: str | None = None
    kind: AnswerKind | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    stop: list[StopString] | None = Field(None, max_length=4)  # as SamplingOverride's
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one answer per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    coe: CoeFields | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def sampling(self) -> SamplingOverride | None:
        fields: dict[str, Any] = {}
        for name in ("temperature", "top_p", "seed"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        tokens = self.max_completion_tokens or self.max_tokens
        if tokens is not None:
            fields["max_tokens"] = tokens
        if self.stop is not None:
            fields["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        return SamplingOverride(**fields) if fields else None

    def question(self, default_id: str, text: str | None, instructions: str | None,
                 messages: list[ConvMessage] | None = None) -> Question:
        extra = self.coe or CoeFields()
        fields: dict[str, Any] = dict(
            id=extra.id or default_id, choices=extra.choices, category=extra.category,
            kind=extra.kind, sampling=self.sampling(), tools=self.tools,
            tool_choice=self.tool_choice if self.tools else None,
            response_format=self.response_format)
        if messages is not None:
            fields["messages"] = messages
        else:
            fields.update(question=text, instructions=instructions)
        return Question(**fields)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content if p.type == "text" and p.text)
        return self.content or ""

    def turn(self) -> ConvMessage:
        """This message as a turn of the conversation (a legacy ``function`` result is a
        ``tool`` turn named after its function)."""
        content = self.text if self.content is not None else None
        return ConvMessage(role="tool" if self.role == "function" else self.role,
                           content=content, name=self.name,
                           tool_calls=tuple(self.tool_calls) if self.tool_calls else None,
                           tool_call_id=self.tool_call_id)


class ChatRequest(_Body):
    messages: list[Message] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _has_question(cls, messages: list[Message]) -> list[Message]:
        users = [m for m in messages if m.role == "user"]
        if not users or not users[-1].text.strip():
            raise ValueError("needs a user message with text (the question)")
        return messages

    def to_question(self, default_id: str) -> Question:
        """The whole conversation: routing reads its last user message first, every recruited
        expert gets every turn."""
        return self.question(default_id, None, None, [m.turn() for m in self.messages])


class CompletionRequest(_Body):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        text = prompt if isinstance(prompt, str) else (prompt[0] if len(prompt) == 1 else None)
        if text is None:
            raise ValueError("one prompt per request")
        if not text.strip():
            raise ValueError("must not be blank")
        return prompt

    def to_question(self, default_id: str) -> Question:
        text = self.prompt if isinstance(self.prompt, str) else self.prompt[0]
        return self.question(default_id, text, None)
