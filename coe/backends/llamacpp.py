"""In-process llama.cpp (llama-cpp-python): the embedded CPU default."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import json
import os
import re
import struct
import time
from typing import Literal

from pydantic import Field

from coe.backends import llamacpp_tools as tools
from coe.backends.base import (
    Backend,
    Capabilities,
    Generation,
    GenRequest,
    OnResult,
    OnToken,
    truncation,
)
from coe.backends.llamacpp_logprobs import echoed, plain
from coe.core.config import ExpertConfig, Resources
from coe.core.errors import ConfigError, ExpertError
from coe.core.types import MAX_TOKENS
from coe.io.model_ref import file_fingerprint, local_file, resolve_model_file

#: ggml's GGML_MAX_N_THREADS: llama.cpp cannot use more threads than this. A fixed cap, not
#: this machine's cores: a yaml is also run on other machines (a Ray cluster's nodes).
MAX_THREADS = 512


class LlamaCppExpert(ExpertConfig):
    backend: Literal["llamacpp"]
    # capped here (a typo of 1e9 would allocate tens of GB before failing); `coe experts
    # --check` also holds it to the model's trained context, read from the GGUF header
    n_ctx: int = Field(2048, gt=0, le=MAX_TOKENS)
    n_threads: int | None = Field(None, gt=0, le=MAX_THREADS)
    reuse_prefix: bool = Field(
        True, description="keep the KV cache of the tokens a prompt shares with the previous "
        "one, in whole blocks of prefix_block tokens: each block is evaluated exactly as it "
        "would be from an empty context, so an answer does not depend on the prompt before "
        "it; false: every prompt from an empty context")
    prefix_block: int = Field(
        32, gt=0, le=4096, description="tokens per prompt-evaluation step (llama.cpp's "
        "n_batch), and the unit in which a shared prefix is kept")
    logprobs: bool = Field(
        False, description="keep every position's logits (llama.cpp's logits_all, a "
        "vocabulary of floats per token of context): the expert can then return token "
        "logprobs and echo a completion's prompt with its logprobs")

    def load_key(self) -> tuple:
        return ("llamacpp", self.model, self.n_ctx, self.n_threads, self.reuse_prefix,
                self.prefix_block, self.logprobs)


# Memory estimate: GGUF size x 1.3, plus an f16 KV cache of n_ctx tokens (its shape read from
# the GGUF header). The 0.3 is what llama.cpp holds besides the weights and the KV cache
# (compute buffers, logits, tokenizer). Measured as RSS after a load and a generation, less the
# KV cache, it was 1.28-1.30 x the GGUF for SmolLM2-135M Q4_1 and Gemma-3-270M Q4_K_M at n_ctx
# 512, 2048 and 8192: the estimate is within 2% of all six (x 1.2 fell 6% short). That part
# does not grow as fast as the weights, so for larger models the estimate errs on the safe side.
OVERHEAD = 1.3
KV_BYTES = 2  # f16 keys and values (llama.cpp's default cache type)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}


def gguf_metadata(path) -> dict:
    """The metadata at the head of a GGUF file, up to the tokenizer's (the model's shape: a
    few hundred bytes; the tokenizer's arrays, megabytes, are not read). Arrays of numbers are
    skipped; whatever cannot be parsed ends the reading."""
    meta: dict = {}
    with open(path, "rb") as f:
        def unpack(fmt: str) -> tuple:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        def string() -> str:
            (n,) = unpack("Q")
            if n > 1 << 16:
                raise ValueError("not a metadata string")
            return f.read(n).decode("utf-8", "replace")

        try:
            magic, _version, _tensors, n_kv = unpack("4sIQQ")
            if magic != b"GGUF":
                return meta
            for _ in range(min(n_kv, 256)):
                key = string()
                if key.startswith("tokenizer."):
                    break
                (kind,) = unpack("I")
                if kind == 8:
                    meta[key] = string()
                elif kind in _SCALARS:
                    (meta[key],) = unpack(_SCALARS[kind])
                elif kind == 9:  # an array: skipped
                    item, n = unpack("IQ")
                    if item in _SCALARS:
                        f.seek(n * struct.calcsize("<" + _SCALARS[item]), 1)
                    elif item == 8 and n < 1024:
                        for _ in range(n):
                            string()
                    else:
                        break
                else:
                    break
        except (struct.error, ValueError):
            pass
    return meta


def kv_cache_bytes(meta: dict, n_ctx: int) -> int:
    """The f16 KV cache of ``n_ctx`` tokens for a model of this GGUF metadata (0: unknown)."""
    arch = meta.get("general.architecture")
    layers = meta.get(f"{arch}.block_count")
    heads = meta.get(f"{arch}.attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
    width = meta.get(f"{arch}.embedding_length")
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, kv_heads, width)):
        return 0
    k = meta.get(f"{arch}.attention.key_length", width // heads)
    v = meta.get(f"{arch}.attention.value_length", width // heads)
    return n_ctx * layers * kv_heads * (k + v) * KV_BYTES


def grammar_format(fmt) -> dict:
    """An OpenAI ``response_format`` as llama-cpp-python takes it: ``json_object`` with the
    schema beside it (it builds the grammar), or plain ``json_object`` (any JSON object)."""
    out: dict = {"type": "json_object"}
    if fmt.type == "json_schema" and fmt.json_schema is not None and fmt.json_schema.schema_:
        out["schema"] = fmt.json_schema.schema_
    return out


def _json_gbnf() -> str:
    from llama_cpp import llama_grammar

    return llama_grammar.JSON_GBNF


@functools.cache
def aligned_llama():
    """llama-cpp-python's ``Llama``, keeping of the previous prompt only what an empty context
    would give again. Its ``generate`` keeps (of the KV cache) the prefix this prompt shares
    with the previous *prompt*, cut down to whole steps of ``n_batch`` tokens, so the rest is
    evaluated in the same steps, from the same positions, as from an empty context: the same
    floating-point operations, the same logits. (llama-cpp-python alone keeps every shared
    token, the previous answer's too, and evaluates the rest in other steps, which rounds
    differently: a greedy answer then depends on the prompt before it.) With
    ``reuse_prefix`` False nothing is kept."""
    from llama_cpp import Llama

    class AlignedLlama(Llama):
        reuse_prefix = True
        last_prompt: list = []
        kept = 0  # tokens of the last prompt taken from the previous one

        def generate(self, tokens, *args, **kwargs):
            tokens = list(tokens)
            keep = 0
            if self.reuse_prefix:
                step, prev = self.n_batch, self.last_prompt
                limit = min(len(prev) // step * step, len(tokens) - 1, self.n_tokens)
                while keep < limit and prev[keep] == tokens[keep]:
                    keep += 1
                keep = keep // step * step
            self.n_tokens = keep  # llama-cpp-python keeps exactly these (0: resets)
            self.last_prompt, self.kept = tokens, keep
            return super().generate(tokens, *args, **kwargs)

    return AlignedLlama


_LOG_CALLBACK = None
# llama-cpp-python's refusal of a prompt that does not fit in the context window
_NO_ROOM = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")


def default_threads() -> int:
    """Threads for a model whose ``n_threads`` is unset: the process's CPU budget when it was
    given one (``OMP_NUM_THREADS``; a Ray actor gets its ``num_cpus`` there), else the cores
    this process may run on (its affinity mask, e.g. ``taskset`` or a container's cpuset) less
    one, and at least one. The core left free is what keeps a shared machine usable: two runs
    at once, or a run beside any other busy process, then each find a core of their own
    instead of making llama.cpp's threads wait for one another at every step (see
    benchmarks/shared_cpu.py)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def wait_passively() -> None:
    """Make OpenMP threads sleep, not spin, while they wait (unless the user chose otherwise).

    llama.cpp's CPU backend here runs its threads with OpenMP (GNU libgomp), whose idle threads
    spin for a while at every barrier: with another process on the machine they burn the CPU
    the working threads need. libgomp reads ``OMP_WAIT_POLICY`` once, when the first library
    using it is loaded (torch, for the embedding router, shares the same ``libgomp.so.1``), so
    ``coe/__init__.py`` sets it before anything is imported, and ``load`` again."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _silence_llama_log() -> None:
    """llama.cpp prints notices to stderr even with verbose=False; drop them."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        import llama_cpp

        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())


class LlamaCppBackend(Backend):
    config_model = LlamaCppExpert
    # a JSON response format is a grammar llama.cpp derives from the schema; tools are a
    # grammar over the tools' schemas (coe.backends.llamacpp_tools)
    capabilities = Capabilities(stream=True, json_schema=True, tools=True)

    @classmethod
    def capabilities_for(cls, config) -> Capabilities:
        """Logprobs and echo only for an expert loaded with every position's logits
        (``logprobs: true``)."""
        if config.logprobs:
            return dataclasses.replace(cls.capabilities, logprobs=True, echo=True)
        return cls.capabilities

    @classmethod
    def check(cls, config, base_dir) -> None:
        """The model file is a GGUF (its header read, not the weights) whose trained context
        holds ``n_ctx``: a longer one costs memory and gives nothing."""
        path = resolve_model_file(config.model, base_dir or ".")
        try:
            meta = gguf_metadata(path)
        except OSError as e:
            raise ConfigError(f"model file {str(path)!r}: {e.strerror or e}") from None
        if not meta:
            raise ConfigError(f"model file {str(path)!r} is not a GGUF file")
        trained = meta.get(f"{meta.get('general.architecture')}.context_length")
        if isinstance(trained, int) and 0 < trained < config.n_ctx:
            raise ConfigError(f"field 'n_ctx': {config.n_ctx} exceeds the model's trained "
                              f"context of {trained} tokens ({path.name})")

    @classmethod
    def reads(cls, config, base_dir) -> list:
        path = local_file(config.model, base_dir or ".")
        return [path] if path is not None else []

    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self.llm = None
        self._path = None

    @property
    def path(self):
        if self._path is None:
            self._path = resolve_model_file(self.config.model, self.base_dir or ".")
        return self._path

    @property
    def label(self) -> str:
        return f"llamacpp:{self.path.name}"

    def estimate_bytes(self) -> int:
        """GGUF size x ``OVERHEAD`` plus the KV cache of ``n_ctx`` tokens, from the file's size
        and header only."""
        try:
            kv = kv_cache_bytes(gguf_metadata(self.path), self.config.n_ctx)
        except OSError:
            kv = 0
        return int(self.path.stat().st_size * OVERHEAD) + kv

    def default_resources(self) -> Resources:
        """One CPU per thread (``n_threads``; unset: one)."""
        return Resources(num_cpus=self.config.n_threads or 1, num_gpus=0)

    def fingerprint(self) -> str:
        # the evaluation step changes how a prompt is rounded: answers made with another
        # step are not these (prefix reuse does not: it keeps the same steps)
        return (f"gguf:{file_fingerprint(self.path)}:ctx{self.config.n_ctx}"
                f":b{self.config.prefix_block}")

    def load(self) -> None:
        wait_passively()  # before llama.cpp's libgomp is first loaded
        _silence_llama_log()
        threads = self.config.n_threads or default_threads()
        try:
            self.llm = aligned_llama()(
                model_path=str(self.path),
                n_ctx=self.config.n_ctx,
                # prompts too: llama-cpp-python's n_threads_batch is every core otherwise,
                # whatever share of the machine the model was given (a Ray actor's CPUs)
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=self.config.prefix_block,
                n_ubatch=self.config.prefix_block,
                logits_all=self.config.logprobs,
                verbose=False,
            )
            self.llm.reuse_prefix = self.config.reuse_prefix
        except (ValueError, RuntimeError, OSError) as e:
            raise ExpertError(self.config.name, f"cannot load {self.path}: {e}") from None

    def _options(self, r: GenRequest) -> dict:
        """llama-cpp-python's arguments for ``r`` beyond the prompt: sampling, a JSON
        response format or the tools as a grammar, logprobs, echo."""
        s = r.sampling
        kw = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                  stop=list(s.stop) or None, seed=s.seed, presence_penalty=s.presence_penalty,
                  frequency_penalty=s.frequency_penalty)
        chat = r.messages is not None
        from llama_cpp import LlamaGrammar

        if chat and tools.wants_tools(r):
            kw["grammar"] = LlamaGrammar.from_string(tools.grammar_text(r), verbose=False)
        elif r.response_format is not None and r.response_format.wants_json:
            schema = grammar_format(r.response_format).get("schema")
            kw["grammar"] = (LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
                             if schema else LlamaGrammar.from_string(_json_gbnf(),
                                                                      verbose=False))
        if r.logprobs is not None:
            if chat:
                kw.update(logprobs=True, top_logprobs=r.logprobs)
            else:
                kw["logprobs"] = r.logprobs
        return kw  # echo: the prompt's part is added after (llamacpp_logprobs)

    def _one(self, r: GenRequest, on_token=None) -> Generation:
        s = r.sampling
        kw = self._options(r)
        chat = r.messages is not None
        calls_tools = chat and tools.wants_tools(r)
        if calls_tools or r.logprobs is not None:
            on_token = None  # the answer comes whole: tool calls, logprobs
        messages = tools.messages(r) if chat else None
        t0 = time.perf_counter()
        # The prefix a prompt shares with the previous one is kept in whole prefix_block
        # steps, evaluated as from an empty context (aligned_llama), or not at all: a greedy
        # answer never depends on the prompt before it (nor the response cache, keyed by the
        # request alone, on the run's order).
        lp = None
        if on_token is None:
            out = (self.llm.create_chat_completion(messages=messages, **kw) if chat
                   else self.llm.create_completion(prompt=r.prompt, **kw))
            choice, usage = out["choices"][0], out["usage"]
            text = (choice["message"]["content"] if chat else choice["text"]) or ""
            prompt_tokens, n = usage["prompt_tokens"], usage["completion_tokens"]
            finish = choice.get("finish_reason")
            lp = choice.get("logprobs")
        else:
            # Streaming: the same decoding (greedy outputs are identical), each piece reported
            # as it comes. llama.cpp's stream carries no usage: a chunk is one sampled token,
            # and the context then holds the prompt plus every sampled token but the last when
            # the generation was cut at max_tokens (that token is never evaluated).
            stream = (self.llm.create_chat_completion(messages=messages, stream=True, **kw)
                      if chat else self.llm.create_completion(prompt=r.prompt, stream=True, **kw))
            pieces, finish = [], None
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = (choice.get("delta", {}).get("content") if chat else choice.get("text"))
                if piece:
                    pieces.append(piece)
                    on_token(piece)
                finish = choice.get("finish_reason") or finish
            text, n = "".join(pieces), len(pieces)
            prompt_tokens = max(0, self.llm.n_tokens - (n - 1 if finish == "length" else n))
        calls = tools.parse(text, r.question_id) if calls_tools else None
        if calls:
            text, finish = "", "tool_calls"
        if r.echo and not chat:
            text = r.prompt + text
            if r.logprobs is not None:
                lp = echoed(self.llm, self.llm.last_prompt, r.logprobs, lp)
        lp = plain(lp)
        # llama.cpp ends an answer that fills the context window with "length" too, having
        # lowered max_tokens to the room the prompt left: n_ctx tells the two apart
        return Generation(text=text, prompt_tokens=prompt_tokens, completion_tokens=n,
                          finish_reason=finish, seconds=time.perf_counter() - t0,
                          truncated_by=truncation(finish, n, s.max_tokens, prompt_tokens,
                                                  self.llm.n_ctx()),
                          tool_calls=calls, logprobs=lp)

    def generate(self, requests: list[GenRequest], on_result: OnResult,
                 on_token: OnToken | None = None) -> None:
        for i, r in enumerate(requests):
            t0 = time.perf_counter()
            try:
                gen = self._one(r, None if on_token is None else
                                (lambda piece, i=i: on_token(i, piece)))
            except ValueError as e:  # e.g. prompt longer than the context
                on_result(i, Generation(error=self._no_room(r, e),
                                        seconds=time.perf_counter() - t0))
                continue
            on_result(i, gen)

    def _no_room(self, r: GenRequest, e: ValueError) -> str:
        """The error of a generation llama.cpp refused, naming the question: a prompt that
        fills the context window ("Requested tokens (N) exceed context window of M") says so
        with the numbers and the yaml field to raise."""
        m = _NO_ROOM.search(str(e))
        if m is None:
            return f"question {r.question_id}: {type(e).__name__}: {e}"
        tokens, n_ctx = int(m[1]), int(m[2])
        return (f"question {r.question_id}: prompt is {tokens:,} tokens, n_ctx {n_ctx:,} "
                f"leaves no room for the answer (raise n_ctx of expert {r.expert!r} or "
                f"shorten the question)")

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = None
        gc.collect()
