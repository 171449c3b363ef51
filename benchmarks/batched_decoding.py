"""Batched decoding in llama.cpp against the llamacpp backend's one-prompt-at-a-time path.

    python benchmarks/batched_decoding.py [--n 32] [--batch-sizes 4,8,16] [--repeat 2]
                                          [--experts smollm2-generalist,gemma3-base] [--threads T]
                                          [--kv-unified] [--one-per-step] [-c experts.yaml]

For each default model (one expert per GGUF of the pool: SmolLM2-135M-Instruct, chat prompts,
max_tokens 96; Gemma-3-270M, completion prompts, max_tokens 16, stop "\\n") the same N prompts
are generated greedily:

- ``sequential``: ``LlamaCppBackend.generate``, the backend's path (``create_chat_completion`` /
  ``create_completion``, one request after another);
- ``batched B``: the same loaded weights, a second llama.cpp context holding B sequences
  (``n_seq_max`` B, one KV stream of ``n_ctx`` cells per sequence), continuous batching: every
  step decodes one token of each running sequence in a single ``llama_decode``, and a finished
  sequence's slot takes the next prompt at once. Each prompt is prefilled on its own (a prompt
  is already a batch of hundreds of tokens).

Prompts: examples/questions.jsonl, then GSM8K and MMLU-Pro questions from ../shared/data (see
its README), made into requests by ``coe.text.prompts.build_request`` exactly as a run makes them,
and tokenized as llama-cpp-python does: a chat prompt is rendered by the model's own chat
handler (the one ``create_chat_completion`` uses; its ``create_completion`` call is
intercepted to take the token ids and stop strings), a completion prompt as
``create_completion`` tokenizes it (checked: every prompt's token count equals the sequential
path's ``prompt_tokens``). Generation mirrors ``Llama._create_completion``: greedy (argmax,
first of equal logits, as llama.cpp's greedy sampler), end-of-generation tokens, stop strings
(the text cut at the first one found, in list order), ``max_tokens`` (lowered to the room the
prompt leaves in ``n_ctx``), incomplete UTF-8 held back.

Both paths use the backend's thread count (the yaml's ``n_threads``, else ``default_threads()``).
The runs are interleaved (sequential, batched 4, 8, 16, sequential, ...) so that other work on
the machine weighs on all alike; the table gives the median of ``--repeat`` runs:

- ``wall s``: the whole generation of the N prompts (the batched context is created beforehand,
  as a backend would at load time);
- ``tokens/s``: generated tokens / wall;
- ``step tok/s``: tokens decoded in generation steps / the time of those ``llama_decode`` calls
  (prefill excluded: what batching can change). Sequential: llama.cpp's own counters
  (``llama_perf_context``: single-token decodes);
- ``identical``: outputs whose text, completion tokens and finish reason equal the first
  sequential run's (and the sequential runs are checked against each other).

A second table isolates what batching could win: the time of one ``llama_decode`` step that
carries one token of each of n sequences, against n single-sequence steps.

Greedy outputs that differ are printed under the table, from the first differing character.
``--kv-unified`` (one KV cache whose cells the sequences share, interleaved) and
``--one-per-step`` (the batched context, but each sequence's step decoded on its own) test
which part of batching changes the outputs. Per-run figures go to stderr.

What it showed (llama-cpp-python 0.3.36, 2 shared AVX cores without AVX2, 1 thread; the
figures are in README.md): no batch size reached 1.3x the sequential tokens/s (0.88-1.03x);
SmolLM2's outputs were all identical, 3-4 of Gemma's 32 differed. Gemma with ``--kv-unified``:
5-6 differ; with ``--one-per-step``: 1 differs, and that one is not batching's doing: the
backend's own greedy answer to that prompt changes with the prompt before it, whose first
3 tokens llama-cpp-python keeps in the KV cache and does not evaluate again (alone, the prompt
gets the batched answer). The others differ because a step of several sequences rounds
differently from a step of one (llama.cpp makes no promise there: ggml-org/llama.cpp#6583).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from coe.backends.llamacpp import LlamaCppBackend, default_threads  # noqa: E402
from coe.core.config import load_config  # noqa: E402
from coe.core.types import Generation, GenRequest, Question  # noqa: E402
from coe.io.questions import load_questions  # noqa: E402
from coe.text.prompts import build_request  # noqa: E402

# -- prompts ---------------------------------------------------------------------------------


def load_prompts(n: int) -> list[Question]:
    """The repo's examples, then GSM8K and MMLU-Pro questions alternately (a fixed spread over
    each set, so that short and long prompts, short and long answers, are mixed)."""
    qs = load_questions(REPO / "examples" / "questions.jsonl").questions[:n]
    if len(qs) >= n:
        return qs
    if not DATA.is_dir():
        sys.exit(f"batched_decoding.py: --n {n} needs {DATA} (GSM8K and MMLU-Pro questions); "
                 f"the repo's examples hold {len(qs)}")
    gsm = load_questions(DATA / "questions" / "gsm8k_test.jsonl").questions
    with zipfile.ZipFile(DATA / "mmlu-pro-outputs" / "model_outputs_gemma-7b_5shots.zip") as z:
        recs = json.loads(z.read(next(x for x in z.namelist() if x.endswith(".json"))))
    mmlu = [Question(id=f"mmlu-{r['question_id']}", question=r["question"],
                     choices=r["options"], category=r["category"]) for r in recs]
    k = 0
    while len(qs) < n:
        src = gsm if k % 2 == 0 else mmlu
        qs.append(src[(k // 2) * 97 % len(src)])
        k += 1
    return qs


@dataclass
class Prompt:
    tokens: list[int]
    stop: list[bytes]
    max_tokens: int


class _Captured(Exception):
    pass


class _Intercept:
    """The loaded ``Llama`` with ``create_completion`` replaced by a capture of its arguments:
    a chat handler called with it renders and tokenizes the prompt exactly as
    ``create_chat_completion`` does, and stops there."""

    def __init__(self, llm):
        self._llm = llm

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def create_completion(self, **kwargs):
        raise _Captured(kwargs)


def prompt_of(llm, r: GenRequest) -> Prompt:
    s = r.sampling
    if s.temperature != 0:
        sys.exit(f"batched_decoding.py: expert {r.expert!r} samples (temperature "
                 f"{s.temperature}); the benchmark compares greedy outputs")
    if r.messages is not None:
        from llama_cpp import llama_chat_format

        handler = (llm.chat_handler or llm._chat_handlers.get(llm.chat_format)
                   or llama_chat_format.get_chat_completion_handler(llm.chat_format))
        try:
            handler(llama=_Intercept(llm), messages=r.chat(), temperature=0.0,
                    max_tokens=s.max_tokens, stop=list(s.stop) or None)
        except _Captured as c:
            kw = c.args[0]
            tokens, stop = list(kw["prompt"]), kw["stop"] or []
        else:
            raise RuntimeError("the chat handler did not call create_completion")
    else:  # Llama._create_completion: BOS when the model adds one, the text with special tokens
        bos = llm.token_bos()
        tokens = (([bos] if llm._model.add_bos_token() and bos != -1 else [])
                  + llm.tokenize(r.prompt.encode("utf-8"), add_bos=False, special=True))
        stop = list(s.stop)
    n_ctx = llm.n_ctx()
    max_tokens = s.max_tokens if s.max_tokens + len(tokens) < n_ctx else n_ctx - len(tokens)
    return Prompt(tokens, [x.encode("utf-8") for x in stop], max_tokens)


# -- batched decoding ------------------------------------------------------------------------


@dataclass
class _Seq:
    index: int
    prompt: Prompt
    tokens: list[int] = field(default_factory=list)
    held: int = 0  # tokens still to wait for an incomplete UTF-8 character
    text: bytes = b""
    finish: str = ""

    def add(self, llm, token: int) -> bool:
        """Take one sampled token; True when the sequence is finished (as the loop of
        ``Llama._create_completion`` decides it)."""
        import llama_cpp

        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            self.text, self.finish = llm.detokenize(self.tokens, prev_tokens=self.prompt.tokens), "stop"
            return True
        self.tokens.append(token)
        text = llm.detokenize(self.tokens, prev_tokens=self.prompt.tokens)
        for k, byte in enumerate(text[-3:]):  # the lead byte of a character not yet complete
            k = 3 - k
            for num, pattern in ((2, 192), (3, 224), (4, 240)):
                if num > k and pattern & byte == pattern:
                    self.held = num - k
        if self.held > 0:
            self.held -= 1
            return False
        found = [s for s in self.prompt.stop if s in text]
        if found:
            self.text, self.finish = text[:text.index(found[0])], "stop"
            return True
        if len(self.tokens) >= self.prompt.max_tokens:
            self.text, self.finish = text, "length"
            return True
        return False


class BatchedDecoder:
    """Up to ``n_seq`` sequences decoded together in one llama.cpp context over ``llm``'s
    weights. Each sequence has a KV stream of its own (``kv_unified`` off, ``n_ctx`` cells
    each): its cells are laid out as when it is decoded alone (one unified cache interleaves the
    sequences' cells, which changes the order of the attention sums; measured: more outputs
    differ)."""

    def __init__(self, llm, n_seq: int, kv_unified: bool = False, one_per_step: bool = False):
        import llama_cpp
        from llama_cpp import _internals

        self.llm, self.n_seq, self.one_per_step = llm, n_seq, one_per_step
        params = llama_cpp.llama_context_default_params()
        for name, _ in llama_cpp.llama_context_params._fields_:  # the backend's own settings
            setattr(params, name, getattr(llm.context_params, name))
        params.n_seq_max = n_seq
        params.kv_unified = kv_unified
        params.n_ctx = llm.n_ctx() * n_seq  # unified or not: n_ctx cells for each sequence
        self.ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self.batch = _internals.LlamaBatch(n_tokens=max(llm.n_batch, n_seq), embd=0, n_seq_max=1,
                                           verbose=False)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.n_vocab = llm.n_vocab()
        self.prefill_s = self.step_s = 0.0
        self.step_tokens = 0

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> float:
        """One ``llama_decode`` of (token, position, sequence, wants logits); its seconds."""
        b = self.batch.batch
        for k, (token, pos, seq, logits) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
            b.seq_id[k][0] = seq
        b.n_tokens = len(entries)
        t0 = time.perf_counter()
        self.ctx.decode(self.batch)
        return time.perf_counter() - t0

    def _argmax(self, i: int) -> int:
        import llama_cpp

        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx.ctx, i),
                                    shape=(self.n_vocab,))
        return int(np.argmax(row))  # the first of equal maxima, as llama.cpp's greedy sampler

    def _start(self, slot: int, seq: _Seq) -> bool:
        """Prefill ``seq``'s prompt in ``slot`` (in chunks of n_batch, as ``Llama.eval``) and
        take its first token; True when that already finished it."""
        toks, n = seq.prompt.tokens, self.llm.n_batch
        for a in range(0, len(toks), n):
            chunk = toks[a:a + n]
            self.prefill_s += self._decode([(t, a + j, slot, j == len(chunk) - 1)
                                            for j, t in enumerate(chunk)])
        return seq.add(self.llm, self._argmax(len(chunk) - 1))

    def run(self, prompts: list[Prompt]) -> list[_Seq]:
        import llama_cpp

        done: list[_Seq | None] = [None] * len(prompts)
        waiting = [_Seq(i, p) for i, p in enumerate(prompts)]
        waiting.reverse()
        running: dict[int, _Seq] = {}

        def free(slot: int, seq: _Seq) -> None:
            done[seq.index] = seq
            llama_cpp.llama_memory_seq_rm(self.memory, slot, -1, -1)

        while waiting or running:
            for slot in range(self.n_seq):
                while slot not in running and waiting:
                    seq = waiting.pop()
                    if self._start(slot, seq):
                        free(slot, seq)
                    else:
                        running[slot] = seq
            if not running:
                continue
            slots = sorted(running)
            entries = [(running[s].tokens[-1], len(running[s].prompt.tokens)
                        + len(running[s].tokens) - 1, s, True) for s in slots]
            if self.one_per_step:  # the same context, but every sequence's step on its own
                tokens = []
                for e in entries:
                    self.step_s += self._decode([e])
                    tokens.append(self._argmax(0))
            else:
                self.step_s += self._decode(entries)
                tokens = [self._argmax(k) for k in range(len(entries))]
            self.step_tokens += len(entries)
            for s, token in zip(slots, tokens):
                if running[s].add(self.llm, token):
                    free(s, running.pop(s))
        return done  # type: ignore[return-value]


STEPS = 32  # decoding steps timed per batch size in the step table

# -- runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    wall: float
    outputs: list[tuple[str, int, str | None]]  # text, completion tokens, finish reason
    step_tokens: int
    step_s: float
    prompt_tokens: int = 0
    prefill_s: float = 0.0
    prompt_counts: list[int] = field(default_factory=list)  # per request (sequential)

    @property
    def tokens(self) -> int:
        return sum(n for _, n, _ in self.outputs)


def run_sequential(backend: LlamaCppBackend, reqs: list[GenRequest]) -> Run:
    import llama_cpp

    llm = backend.llm
    llm.reset()  # as after a load: no prompt prefix left in the KV cache from the previous run
    llama_cpp.llama_perf_context_reset(llm.ctx)
    gens: list[Generation | None] = [None] * len(reqs)
    t0 = time.perf_counter()
    backend.generate(reqs, lambda i, g: gens.__setitem__(i, g))
    wall = time.perf_counter() - t0
    perf = llama_cpp.llama_perf_context(llm.ctx)
    bad = [g.error for g in gens if g is None or g.error]
    if bad:
        sys.exit(f"batched_decoding.py: a sequential generation failed: {bad[0]}")
    return Run(wall, [(g.text, g.completion_tokens, g.finish_reason) for g in gens],
               perf.n_eval, perf.t_eval_ms / 1000, perf.n_p_eval, perf.t_p_eval_ms / 1000,
               [g.prompt_tokens for g in gens])


def run_batched(llm, prompts: list[Prompt], n_seq: int, **layout) -> Run:
    decoder = BatchedDecoder(llm, n_seq, **layout)
    try:
        t0 = time.perf_counter()
        seqs = decoder.run(prompts)
        wall = time.perf_counter() - t0
    finally:
        decoder.close()
    return Run(wall, [(s.text.decode("utf-8", errors="ignore"), len(s.tokens), s.finish)
                      for s in seqs],
               decoder.step_tokens, decoder.step_s, sum(len(p.tokens) for p in prompts),
               decoder.prefill_s)


def step_seconds(llm, prompt: Prompt, n_seq: int, steps: int, kv_unified: bool) -> list[float]:
    """The seconds of each of ``steps`` decoding steps of ``n_seq`` sequences, all started from
    ``prompt`` (the greedy tokens are fed back; stops and max_tokens are ignored)."""
    decoder = BatchedDecoder(llm, n_seq, kv_unified)
    try:
        toks = prompt.tokens[:llm.n_batch]
        last = []
        for slot in range(n_seq):
            decoder._decode([(t, j, slot, j == len(toks) - 1) for j, t in enumerate(toks)])
            last.append(decoder._argmax(len(toks) - 1))
        times = []
        for k in range(steps):
            times.append(decoder._decode([(last[s], len(toks) + k, s, True)
                                          for s in range(n_seq)]))
            last = [decoder._argmax(s) for s in range(n_seq)]
        return times
    finally:
        decoder.close()


def first_difference(a: str, b: str, width: int = 60) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - 20)
    return f"…{a[start:i + width]!r} | …{b[start:i + width]!r}"


def bench_model(expert, base_dir: Path, questions: list[Question], sizes: list[int],
                repeat: int, layout: dict) -> tuple[list[str], list[str], list[str]]:
    """This expert's rows of the main table and of the step table, and its differing outputs."""
    backend = LlamaCppBackend(expert, base_dir)
    backend.load()
    name = backend.path.name
    try:
        llm = backend.llm
        reqs = [build_request(expert, q) for q in questions]
        prompts = [prompt_of(llm, r) for r in reqs]
        counts = [len(p.tokens) for p in prompts]
        modes = [0, *sizes]  # 0: sequential
        runs: dict[int, list[Run]] = {m: [] for m in modes}
        for rep in range(repeat):
            for m in modes:
                run = (run_sequential(backend, reqs) if m == 0
                       else run_batched(llm, prompts, m, **layout))
                runs[m].append(run)
                if m == 0 and run.prompt_counts != counts:
                    i = next(i for i, (a, b) in enumerate(zip(run.prompt_counts, counts)) if a != b)
                    sys.exit(f"batched_decoding.py: prompt {i} is {counts[i]} tokens here, "
                             f"{run.prompt_counts[i]} on the backend's path")
                label = "sequential" if m == 0 else f"batched {m}"
                print(f"  [{name} run {rep + 1}] {label}: {run.wall:.2f}s, "
                      f"{run.tokens} tokens, {run.step_tokens} in steps of "
                      f"{run.step_s:.2f}s, prefill {run.prompt_tokens} tokens "
                      f"{run.prefill_s:.2f}s", file=sys.stderr, flush=True)
        step_ms: dict[int, list[float]] = {m: [] for m in [1, *sizes]}
        for rep in range(repeat):  # interleaved too
            for m in step_ms:
                times = step_seconds(llm, prompts[0], m, STEPS, layout["kv_unified"])
                step_ms[m].append(statistics.median(times) * 1000)
                print(f"  [{name} steps {rep + 1}] {m} sequences: {step_ms[m][-1]:.1f} ms "
                      f"per step", file=sys.stderr, flush=True)
    finally:
        backend.unload()

    reference = runs[0][0]
    rows, diffs = [], []
    seq_tps = statistics.median(r.tokens / r.wall for r in runs[0])
    for m in modes:
        rs = runs[m]
        wall = statistics.median(r.wall for r in rs)
        tps = statistics.median(r.tokens / r.wall for r in rs)
        step = statistics.median(r.step_tokens / r.step_s for r in rs if r.step_s > 0)
        same = min(sum(o == ref for o, ref in zip(r.outputs, reference.outputs)) for r in rs)
        label = "sequential (backend)" if m == 0 else "batched"
        rows.append(f"| {name} | {label} | {m or 1} | {wall:.2f} | {rs[0].tokens} | "
                    f"{tps:.1f} | {tps / seq_tps:.2f}x | {step:.1f} | "
                    f"{same}/{len(reference.outputs)} |")
        for i, (o, ref) in enumerate(zip(rs[-1].outputs, reference.outputs)):
            if o != ref:
                diffs.append(f"- {name}, {label} {m}, prompt {i} ({questions[i].id}, "
                             f"{counts[i]} prompt tokens): {first_difference(ref[0], o[0])} "
                             f"(tokens {ref[1]} / {o[1]}, finish {ref[2]} / {o[2]})")
    one = statistics.median(step_ms[1])
    steps = []
    for m, ms in step_ms.items():
        per_step = statistics.median(ms)
        steps.append(f"| {name} | {m} | {per_step:.1f} | {per_step / m:.1f} | "
                     f"{1000 * m / per_step:.1f} | {one * m / per_step:.2f}x |")
    return rows, diffs, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", default=str(REPO / "experts.yaml"))
    ap.add_argument("--experts", default="smollm2-generalist,gemma3-base",
                    help="llamacpp experts to measure, one per model (default: the pool's two)")
    ap.add_argument("--n", type=int, default=32, help="prompts per model (default 32)")
    ap.add_argument("--batch-sizes", default="4,8,16", help="sequences per batch (default 4,8,16)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode (default 2)")
    ap.add_argument("--kv-unified", action="store_true",
                    help="one KV cache shared by the sequences (their cells interleaved)")
    ap.add_argument("--one-per-step", action="store_true",
                    help="decode each sequence's step on its own (the layout without batching)")
    ap.add_argument("--threads", type=int, default=None,
                    help="n_threads for both paths (default: the expert's, else default_threads())")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    config = load_config(args.config)
    base_dir = Path(args.config).resolve().parent
    questions = load_prompts(args.n)

    import llama_cpp

    experts = [config.expert(name) for name in args.experts.split(",") if name]
    if args.threads:
        experts = [e.model_copy(update={"n_threads": args.threads}) for e in experts]
    threads = sorted({e.n_threads or default_threads() for e in experts})
    layout = {"kv_unified": args.kv_unified, "one_per_step": args.one_per_step}
    print(f"llama-cpp-python {llama_cpp.__version__}; {len(questions)} prompts per model; "
          f"threads {', '.join(map(str, threads))} (both paths); repeat {args.repeat} "
          f"(median); greedy; batched KV: {'unified' if args.kv_unified else 'a stream per sequence'}"
          f"{'; one sequence per decode call' if args.one_per_step else ''}")
    print()
    print("| model | decoding | batch | wall s | tokens | tokens/s | vs sequential | "
          "step tok/s | identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    all_diffs, all_steps = [], []
    for e in experts:
        rows, diffs, steps = bench_model(e, base_dir, questions, sizes, args.repeat, layout)
        print("\n".join(rows), flush=True)
        all_diffs += diffs
        all_steps += steps
    print()
    print(f"One decoding step of n sequences (each {STEPS} steps after the first prompt; "
          f"median step, median of the repeats):")
    print()
    print("| model | sequences per step | ms per step | ms per token | step tok/s | "
          "vs one at a time |")
    print("|---|---|---|---|---|---|")
    print("\n".join(all_steps))
    if all_diffs:
        print()
        print("Outputs that differ from the sequential ones (sequential | batched):")
        print("\n".join(all_diffs))


if __name__ == "__main__":
    main()
