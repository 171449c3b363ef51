"""Any OpenAI-compatible endpoint through the official ``openai`` async client.

Bounded concurrency (``max_concurrency``); retries with exponential backoff on 429, 5xx,
timeouts and connection errors are the client's own (it honours ``Retry-After``), capped by
``max_retries``. When the endpoint is unreachable after those retries, the remaining requests
fail at once instead of each retrying against a dead server. The API key is read from the
environment variable the yaml names and never written anywhere.
"""

from __future__ import annotations

import asyncio
import os
import time

from coe.errors import ExpertError
from coe.experts.base import Backend, Generation, GenRequest, OnResult


class OpenAIBackend(Backend):
    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self._key: str | None = None

    @property
    def label(self) -> str:
        return f"openai:{self.config.model}@{self.config.base_url}"

    def fingerprint(self) -> str:
        return f"openai:{self.config.base_url.rstrip('/')}:{self.config.model}"

    def load(self) -> None:
        env = self.config.api_key_env
        if env:
            key = os.environ.get(env)
            if not key:
                raise ExpertError(self.config.name, f"environment variable {env} is not set")
            self._key = key
        else:
            self._key = "no-key"  # local servers accept any key

    def redact(self, text: str) -> str:
        if self._key and self._key != "no-key":
            text = text.replace(self._key, "***")
        return text

    async def _one(self, client, r: GenRequest) -> Generation:
        s = self.config.sampling if r.sampling is None else r.sampling
        kw = dict(model=self.config.model, temperature=s.temperature, top_p=s.top_p,
                  max_tokens=s.max_tokens)
        if s.stop:
            kw["stop"] = list(s.stop)
        if s.seed is not None:
            kw["seed"] = s.seed
        t0 = time.perf_counter()
        if r.messages is not None:
            out = await client.chat.completions.create(messages=r.chat(), **kw)
            text = out.choices[0].message.content or ""
        else:
            out = await client.completions.create(prompt=r.prompt, **kw)
            text = out.choices[0].text or ""
        usage = out.usage
        return Generation(text=text, seconds=time.perf_counter() - t0,
                          prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                          completion_tokens=getattr(usage, "completion_tokens", 0) or 0)

    async def _run(self, requests: list[GenRequest], on_result: OnResult) -> None:
        import openai

        sem = asyncio.Semaphore(self.config.max_concurrency)
        dead: list[str] = []

        async with openai.AsyncOpenAI(base_url=self.config.base_url, api_key=self._key,
                                      timeout=self.config.timeout,
                                      max_retries=self.config.max_retries) as client:

            async def worker(i: int, r: GenRequest) -> None:
                async with sem:
                    if dead:
                        on_result(i, Generation(error=dead[0]))
                        return
                    try:
                        gen = await self._one(client, r)
                    except openai.APIConnectionError as e:  # includes timeouts
                        msg = self.redact(f"{type(e).__name__}: {e} ({self.config.base_url})")
                        if not isinstance(e, openai.APITimeoutError):
                            dead.append(msg)
                        gen = Generation(error=msg)
                    except openai.APIStatusError as e:
                        gen = Generation(error=self.redact(f"HTTP {e.status_code}: {e.message}"))
                    except (openai.OpenAIError, ValueError, AttributeError, IndexError) as e:
                        gen = Generation(error=self.redact(f"{type(e).__name__}: {e}"))
                    on_result(i, gen)

            await asyncio.gather(*(worker(i, r) for i, r in enumerate(requests)))

    def generate(self, requests: list[GenRequest], on_result: OnResult) -> None:
        asyncio.run(self._run(requests, on_result))

    def unload(self) -> None:
        self._key = None
