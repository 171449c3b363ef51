"""Any OpenAI-compatible endpoint through the official ``openai`` async client.

Bounded concurrency (``max_concurrency`` requests in flight). Retries are the client's own:
on connection errors, timeouts, 408/409/429 and 5xx it retries up to ``max_retries`` times with
exponential backoff and jitter, honouring ``Retry-After`` (up to two minutes); nothing here
re-implements that. A request that still fails is reported on its own ``Generation.error``
(one line, the key redacted) and the batch goes on.

Circuit breaker: when a request fails with a retryable error *after all its retries* and no
other request has succeeded since it started, the endpoint is taken to be down (stopped,
killed, rate-limiting everything): the requests not yet sent fail at once instead of each
spending its own round of retries against it. An endpoint that is merely overloaded (other
requests keep succeeding) does not trip it. A 200 whose body is not the expected JSON is not
retried (the client treats it as a valid answer): it fails that request with a clear message.

``timeout`` bounds each *attempt* as a whole: connecting, sending, and reading the entire
answer, a streamed one included (the HTTP client's own timeouts act per read, so a server
sending one byte a second kept a ``timeout: 2`` request open for as long as it liked). An
attempt cut short is a timeout like any other, so the client retries it: the worst case for one
request is ``(max_retries + 1) x timeout`` plus the backoff between attempts. Per attempt
rather than per request because that is what a retry is for: a retry after a timeout gets the
full time again instead of whatever the first attempt left over. A stream cut short is not
retried (part of the answer has already gone out).

The API key is read from the environment variable the yaml names (``api_key_env``), never
from the yaml, and never written anywhere. The key and the credentials written into
``base_url`` (``user:password@``, which the client sends as Basic auth *instead of* the key,
and the query string) are added to ``coe.core.secrets`` as soon as the expert's config is read, so
every form of them (raw, base64, percent-encoded) is hidden from every error message (the
*whole* text is redacted before it is cut short), every answer text and every streamed piece
(a ``StreamRedactor``: a secret cut across pieces is hidden too).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import sys
import time
from typing import Literal

from pydantic import Field

from coe.backends.base import (
    Backend,
    Capabilities,
    Generation,
    GenRequest,
    OnResult,
    OnToken,
    run_sync,
    truncation,
)
from coe.core import secrets
from coe.core.config import ExpertConfig
from coe.core.errors import ConfigError, ExpertError
from coe.core.types import ToolCall

MAX_ERROR_CHARS = 300


class BadResponse(ValueError):
    """The endpoint answered 200 with a body that is not a completion."""


def _snippet(value) -> str:
    """A short one-line excerpt of a body, its secrets hidden *before* it is cut."""
    return re.sub(r"\s+", " ", secrets.redact(str(value))).strip()[:120]


def _http():
    """The HTTP library the installed ``openai`` client is built on (``httpx``, or ``httpx2``
    in later releases): its timeout exception is the one the client retries."""
    import openai

    client = next(c for c in openai.DefaultAsyncHttpxClient.__mro__ if c.__name__ == "AsyncClient")
    return sys.modules[client.__module__.split(".")[0]]


class StreamTimeout(TimeoutError):
    """A streamed answer did not finish within the attempt's ``timeout``."""


@functools.cache
def _bounded_client_class():
    """``openai``'s default async HTTP client, with every ``send`` (one attempt: the client's
    retry loop calls it once per attempt) bounded as a whole by a deadline, the body included.
    Past it, the attempt raises the HTTP library's ``ReadTimeout``, which the ``openai`` client
    retries and reports as ``APITimeoutError``, as it does its own timeouts."""
    import openai

    http = _http()

    class DeadlineStream(http.AsyncByteStream):
        """A response body that must be read to its end by ``deadline`` (loop time)."""

        def __init__(self, stream, deadline: float, request, seconds: float):
            self._stream, self._deadline = stream, deadline
            self._request, self._seconds = request, seconds

        async def __aiter__(self):
            chunks = self._stream.__aiter__()
            while True:
                try:
                    async with asyncio.timeout_at(self._deadline):
                        chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise http.ReadTimeout(f"no complete answer within {self._seconds:g}s",
                                           request=self._request) from None
                yield chunk

        async def aclose(self) -> None:
            await self._stream.aclose()

    class BoundedClient(openai.DefaultAsyncHttpxClient):
        def __init__(self, attempt_timeout: float, **kwargs):
            super().__init__(**kwargs)
            self.attempt_timeout = attempt_timeout

        async def send(self, request, *, stream: bool = False, **kwargs):
            deadline = asyncio.get_running_loop().time() + self.attempt_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    response = await super().send(request, stream=True, **kwargs)
            except TimeoutError:
                raise http.ReadTimeout(f"no answer within {self.attempt_timeout:g}s",
                                       request=request) from None
            response.stream = DeadlineStream(response.stream, deadline, request,
                                             self.attempt_timeout)
            if not stream:  # read the whole body now, as the plain client does
                try:
                    await response.aread()
                except BaseException:
                    await response.aclose()
                    raise
            return response

    return BoundedClient


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """``base_url`` without its query string, and that query as parameters. The client joins
    each endpoint's path to the base URL as text, so ``https://h/openai/deployments/d?api-version=1``
    would become ``...d?api-version=1/chat/completions``: the query goes in ``default_query``
    instead (Azure OpenAI's ``api-version``), sent with every request."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit

    u = urlsplit(url)
    if not u.query:
        return url, {}
    return (urlunsplit((u.scheme, u.netloc, u.path, "", u.fragment)),
            dict(parse_qsl(u.query, keep_blank_values=True)))


class OpenAIExpert(ExpertConfig):
    backend: Literal["openai"]
    base_url: str = Field(min_length=1)
    api_key_env: str | None = None
    max_concurrency: int = Field(8, gt=0)
    timeout: float = Field(60.0, gt=0)  # seconds per attempt, the whole answer included
    max_retries: int = Field(4, ge=0)

    def model_post_init(self, context) -> None:
        # known as soon as the yaml is read, so whatever this process writes (a driver whose
        # backends run elsewhere included) can hide them
        secrets.add_url(self.base_url)
        if self.api_key_env:
            secrets.add(os.environ.get(self.api_key_env))

    def load_key(self) -> tuple:
        # Loading an endpoint costs nothing, so experts share a backend only when every
        # connection option agrees (each keeps its own concurrency, timeout and retries).
        return ("openai", self.base_url, self.model, self.api_key_env, self.max_concurrency,
                self.timeout, self.max_retries)


class OpenAIBackend(Backend):
    config_model = OpenAIExpert
    # an endpoint (nothing resident here) that takes every field of the API: whether the server
    # behind it honours them is its own affair, and its refusal comes back as its error
    capabilities = Capabilities(holds_weights=False, stream=True, tools=True, json_schema=True,
                                logprobs=True, echo=True)

    @classmethod
    def check(cls, config, base_dir) -> None:
        if config.api_key_env and not os.environ.get(config.api_key_env):
            raise ConfigError(f"environment variable {config.api_key_env} is not set")

    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self._key: str | None = None

    @property
    def shown_url(self) -> str:
        """The endpoint as printed: credentials in the URL (user:password@, ?key=) hidden."""
        from urllib.parse import urlsplit, urlunsplit

        u = urlsplit(self.config.base_url)
        host = u.hostname or ""
        if u.port:
            host += f":{u.port}"
        if u.username or u.password:
            host = "***@" + host
        return urlunsplit((u.scheme, host, u.path, "***" if u.query else "", ""))

    @property
    def label(self) -> str:
        return f"openai:{self.config.model}@{self.shown_url}"

    def fingerprint(self) -> str:
        return f"openai:{self.config.base_url.rstrip('/')}:{self.config.model}"

    def load(self) -> None:
        env = self.config.api_key_env
        if env:
            key = os.environ.get(env)
            if not key:
                raise ExpertError(self.config.name, f"environment variable {env} is not set")
            secrets.add(key)
            self._key = key
        else:
            self._key = "no-key"  # local servers accept any key; never the ambient OPENAI_API_KEY

    def redact(self, text: str) -> str:
        """Hide every form of the API key, of the credentials written into base_url, and of
        any other secret this process knows."""
        return secrets.redact(text)

    def _message(self, text: str) -> str:
        """One line, bounded, without the key."""
        text = re.sub(r"\s+", " ", self.redact(str(text))).strip()
        return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS - 3] + "..."

    def _describe(self, e: Exception) -> tuple[str, bool]:
        """(message, retryable): retryable errors are the ones the client already retried."""
        import openai

        n = self.config.max_retries
        retries = f"after {n} {'retry' if n == 1 else 'retries'}"
        if isinstance(e, openai.APITimeoutError):
            return f"timed out ({self.config.timeout:g}s) {retries}: {self.shown_url}", True
        if isinstance(e, StreamTimeout):
            return (f"timed out ({self.config.timeout:g}s) reading the streamed answer: "
                    f"{self.shown_url}"), True
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e.__context__
            why = f"{type(cause).__name__}: {cause}" if cause else str(e)
            return f"connection to {self.shown_url} failed {retries}: {why}", True
        if isinstance(e, openai.APIStatusError):
            code = e.status_code
            retryable = code in (408, 409, 429) or code >= 500
            detail = e.message
            if isinstance(e.body, str) and e.body:  # not JSON (a proxy's HTML page)
                detail += f" - {_snippet(e.body)}"
            return (f"HTTP {code}{' ' + retries if retryable else ''}: {detail}"
                    f" ({self.shown_url})"), retryable
        if isinstance(e, BadResponse):
            return f"{e} ({self.shown_url})", False
        if isinstance(e, json.JSONDecodeError):
            return f"response is not valid JSON ({e}) ({self.shown_url})", False
        return f"{type(e).__name__}: {e}", False

    async def _stream(self, client, r: GenRequest, kw: dict, on_token) -> Generation:
        """One request streamed: each piece reported as it arrives. Usage comes in the last
        chunk where the server honours ``stream_options`` (OpenAI, vLLM); elsewhere the
        chunks are counted."""
        import openai

        t0 = time.perf_counter()
        kw = dict(kw, stream=True, stream_options={"include_usage": True})
        if r.messages is not None:
            stream = await client.chat.completions.create(messages=r.chat(), **kw)
        else:
            stream = await client.completions.create(prompt=r.prompt, **kw)
        pieces, finish, usage, chunks = [], None, None, 0
        hidden = secrets.stream()  # a secret split across pieces is whole before it goes out
        try:
            async for chunk in stream:
                usage = getattr(chunk, "usage", None) or usage
                for choice in getattr(chunk, "choices", None) or []:
                    piece = (choice.delta.content if r.messages is not None else choice.text)
                    if piece:
                        pieces.append(piece)
                        chunks += 1
                        safe = hidden.feed(piece)
                        if safe:
                            on_token(safe)
                    finish = choice.finish_reason or finish
        except (openai.APITimeoutError, _http().TimeoutException) as e:  # mid-stream: the
            raise StreamTimeout(str(e)) from e  # attempt's deadline (a stream is not retried)
        if finish is None:  # cut off: llama_cpp.server ends a stream when another request comes
            raise BadResponse(f"stream ended before the answer did (no finish_reason) after "
                              f"{chunks} pieces")
        rest = hidden.flush()
        if rest:
            on_token(rest)
        done = (getattr(usage, "completion_tokens", 0) or 0) if usage else chunks
        return Generation(text=self.redact("".join(pieces)), seconds=time.perf_counter() - t0,
                          finish_reason=finish,
                          truncated_by=truncation(finish, done, kw["max_tokens"]),
                          prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                          completion_tokens=(getattr(usage, "completion_tokens", 0) or 0)
                          if usage else chunks)

    def _options(self, r: GenRequest) -> dict:
        """Every field of the request the API takes, beyond the prompt."""
        s = self.config.sampling if r.sampling is None else r.sampling
        kw = dict(model=self.config.model, temperature=s.temperature, top_p=s.top_p,
                  max_tokens=s.max_tokens)
        if s.stop:
            kw["stop"] = list(s.stop)
        if s.seed is not None:
            kw["seed"] = s.seed
        if s.presence_penalty:
            kw["presence_penalty"] = s.presence_penalty
        if s.frequency_penalty:
            kw["frequency_penalty"] = s.frequency_penalty
        if r.tools:
            kw["tools"] = [tool.model_dump(exclude_none=True) for tool in r.tools]
            if r.tool_choice is not None:
                kw["tool_choice"] = (r.tool_choice if isinstance(r.tool_choice, str)
                                     else r.tool_choice.model_dump())
        if r.response_format is not None:
            kw["response_format"] = r.response_format.model_dump(by_alias=True,
                                                                exclude_none=True)
        if r.logprobs is not None:
            if r.messages is not None:
                kw["logprobs"] = True
                if r.logprobs:
                    kw["top_logprobs"] = r.logprobs
            else:
                kw["logprobs"] = r.logprobs
        if r.echo and r.messages is None:
            kw["echo"] = True
        return kw

    async def _one(self, client, r: GenRequest, on_token=None) -> Generation:
        kw = self._options(r)
        if on_token is not None and not r.tools and r.logprobs is None:
            return await self._stream(client, r, kw, on_token)  # (tool calls, logprobs: whole)
        t0 = time.perf_counter()
        if r.messages is not None:
            out = await client.chat.completions.create(messages=r.chat(), **kw)
        else:
            out = await client.completions.create(prompt=r.prompt, **kw)
        if isinstance(out, str):  # a non-JSON body: the client hands back the raw text
            raise BadResponse(f"response is not JSON: {_snippet(out)!r}")
        choices = getattr(out, "choices", None)
        if not choices:
            raise BadResponse(f"response has no choices: {_snippet(out)!r}")
        calls = None
        if r.messages is not None:
            message = choices[0].message
            text = message.content or ""
            if message.tool_calls:
                calls = [ToolCall.model_validate(c.model_dump(include={"id", "type", "function"}))
                         for c in message.tool_calls]
        else:
            text = choices[0].text or ""
        lp = getattr(choices[0], "logprobs", None)
        usage = out.usage
        finish = getattr(choices[0], "finish_reason", None)
        return Generation(text=self.redact(text), seconds=time.perf_counter() - t0,
                          finish_reason=finish,
                          truncated_by=truncation(finish, getattr(usage, "completion_tokens", 0)
                                                  or 0, kw["max_tokens"]),
                          prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                          completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                          tool_calls=calls, logprobs=lp.model_dump() if lp is not None else None)

    async def agenerate(self, requests: list[GenRequest], on_result: OnResult,
                        on_token: OnToken | None = None) -> None:
        """Every request through one async client, ``max_concurrency`` in flight."""
        import openai

        sem = asyncio.Semaphore(self.config.max_concurrency)
        down: list[str] = []  # set once the endpoint is taken to be down
        last_ok = [float("-inf")]  # when a request last succeeded

        http_client = _bounded_client_class()(attempt_timeout=self.config.timeout,
                                              timeout=self.config.timeout)
        base_url, query = split_query(self.config.base_url)
        async with openai.AsyncOpenAI(base_url=base_url, api_key=self._key,
                                      timeout=self.config.timeout,
                                      max_retries=self.config.max_retries,
                                      default_query=query or None,
                                      http_client=http_client) as client:

            async def worker(i: int, r: GenRequest) -> None:
                async with sem:
                    if down:
                        on_result(i, Generation(error=f"not sent, endpoint down: {down[0]}"))
                        return
                    started = time.monotonic()
                    try:
                        gen = await self._one(client, r, None if on_token is None else
                                              (lambda piece: on_token(i, piece)))
                        last_ok[0] = time.monotonic()
                    except (openai.OpenAIError, ValueError, AttributeError, IndexError,
                            TypeError, StreamTimeout) as e:
                        msg, retryable = self._describe(e)
                        msg = self._message(msg)
                        if retryable and last_ok[0] < started and not down:
                            down.append(msg)
                        gen = Generation(error=msg)
                    on_result(i, gen)

            await asyncio.gather(*(worker(i, r) for i, r in enumerate(requests)))

    def generate(self, requests: list[GenRequest], on_result: OnResult,
                 on_token: OnToken | None = None) -> None:
        run_sync(self.agenerate(requests, on_result, on_token))

    def unload(self) -> None:
        self._key = None
