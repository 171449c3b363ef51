"""The service's request bodies (the OpenAI API's) and how one becomes a ``Request``: the
whole conversation, with the body's tools, tool choice, response format and generation options
(temperature, top_p, max_tokens or max_completion_tokens, stop, seed, penalties, n, logprobs,
top_logprobs; a text completion's echo).

A field that changes the answer and that no backend here honours (``logit_bias``, ``suffix``,
``best_of``, token-id prompts...) is refused (400 naming it) rather than silently ignored;
fields that change nothing (``user``, ``parallel_tool_calls``, ``metadata``...) are accepted.
Whether the composition asked for can honour the rest (tools, JSON, logprobs) is decided once
its experts are known (``coe.apps.serve.honour``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from coe.core.request import MAX_N, MAX_TOP_LOGPROBS
from coe.core.types import (
    MAX_TOKENS,
    AnswerKind,
    GenerationOptions,
    Question,
    ResponseFormat,
    StopString,
    Tool,
    ToolCall,
    ToolChoice,
)
from coe.core.types import Message as ConvMessage

MAX_ID_CHARS = 200
#: the most prompts one ``/v1/completions`` request may hold
MAX_PROMPTS = 64
#: the most alternatives per token a text completion may ask for (the OpenAI API's)
MAX_COMPLETION_LOGPROBS = 5


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


#: fields of the OpenAI API that change the answer and that no backend here honours: refused
#: (400 naming the field) when given a value other than their default, never ignored
UNSUPPORTED = {
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix (text after the insertion point) is not supported",
    "functions": "functions is the API's old form of tools: send tools",
    "function_call": "function_call is the API's old form of tool_choice: send tool_choice",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    stop: list[StopString] | None = Field(None, max_length=4)  # as SamplingOverride's
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N, description="independent answers (choices)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    coe: CoeFields | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator(*UNSUPPORTED, mode="after")
    @classmethod
    def _unsupported(cls, v: Any, info) -> Any:
        if v not in (None, {}, [], "", ["text"]):
            raise ValueError(UNSUPPORTED[info.field_name])
        return v

    def logprob_fields(self) -> dict[str, Any]:
        """``logprobs`` and ``top_logprobs`` as ``GenerationOptions`` takes them."""
        return {}

    def sampling(self) -> GenerationOptions | None:
        fields: dict[str, Any] = {}
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        tokens = self.max_completion_tokens or self.max_tokens
        if tokens is not None:
            fields["max_tokens"] = tokens
        if self.stop is not None:
            fields["stop"] = self.stop
        if self.n != 1:
            fields["n"] = self.n
        fields.update(self.logprob_fields())
        return GenerationOptions(**fields) if fields else None

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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def logprob_fields(self) -> dict[str, Any]:
        if not self.logprobs:
            return {}
        return {"logprobs": True, "top_logprobs": self.top_logprobs}

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
    """A text completion: one prompt, or a list of prompts (one choice per prompt and sample,
    ``index`` = prompt x n + sample, as the OpenAI API numbers them)."""

    prompt: str | list[str] = Field(description="text; token ids are not supported")
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompts(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
            raise ValueError("token-id prompts are not supported: send the prompt as text")
        return prompt

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list[str]) -> str | list[str]:
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not texts:
            raise ValueError("needs at least one prompt")
        if len(texts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        if any(not t.strip() for t in texts):
            raise ValueError("must not be blank")
        return prompt

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of (several samples ranked by likelihood) is not supported")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def logprob_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"echo": True} if self.echo else {}
        if self.logprobs is not None:
            out.update(logprobs=True, top_logprobs=self.logprobs)
        return out

    def to_questions(self, default_id: str) -> list[Question]:
        """One request per prompt (ids ``<id>-<i>`` when there are several)."""
        prompts = self.prompts
        if len(prompts) == 1:
            return [self.question(default_id, prompts[0], None)]
        return [self.question(f"{default_id}-{i}", text, None) for i, text in enumerate(prompts)]

    def to_question(self, default_id: str) -> Question:
        return self.to_questions(default_id)[0]
