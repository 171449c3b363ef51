"""Issue 14, defect 4: no form of a secret the process knows reaches anything ``coe`` writes.

A misbehaving OpenAI-compatible endpoint on 127.0.0.1 (``tests/proxy.py``'s ``FaultProxy``,
every request answered by an injected fault, nothing forwarded) echoes the request headers
(``user:password@`` in ``base_url`` goes out as ``Authorization: Basic base64(user:password)``),
answers non-JSON error bodies with the key and the password placed across the old 120-character
snippet cut, and a 200 completion whose text repeats the secrets in other encodings (so they
would reach the response cache and the ``--record`` files, which never hold errors).

``coe run -o`` and ``coe eval --record`` run as real processes; stdout, stderr and every file
under the test directory (answers, the response cache, the eval report, the replay files) are
searched for each form of each secret: raw, base64 (and Basic auth's base64 of
``user:password``), percent-encoded (``quote``/``quote_plus``), and any 12 characters of
those in a row (what a truncated snippet used to leak).
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.support.openai_server import MODEL_ALIAS, free_port, openai_expert, run_cli, write_pool
from tests.support.proxy import Fault, FaultProxy


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def planted() -> dict[str, str]:
    """A long key and a password with characters that percent-encoding and base64 change."""
    h, k1, k2 = (uuid.uuid4().hex for _ in range(3))
    return {"user": "coe-user", "password": f"{h[:12]}/{h[12:24]}+pw=",
            "key": f"sk-{k1}/{k2}+key=="}


def forms(s: dict[str, str]) -> dict[str, str]:
    key, pw, user = s["key"], s["password"], s["user"]
    return {
        "key": key, "key base64": b64(key), "key quote": quote(key, safe=""),
        "key quote_plus": quote_plus(key), "password": pw, "password base64": b64(pw),
        "password quote": quote(pw, safe=""), "password quote_plus": quote_plus(pw),
        "basic auth": b64(f"{user}:{pw}"), "user:password": f"{user}:{pw}",
    }


WINDOW = 12  # characters: a secret cut short still shows this much of itself


def leaks(text: str | bytes, secret_forms: dict[str, str]) -> list[str]:
    """The forms found in ``text``, whole or any ``WINDOW`` characters of them (a cut one)."""
    data = text.encode() if isinstance(text, str) else text
    return [name for name, f in secret_forms.items()
            if any(f[i:i + WINDOW].encode() in data for i in range(len(f) - WINDOW + 1))]


def completion(text: str) -> str:
    return json.dumps({"id": "cmpl-1", "object": "text_completion", "created": 0,
                       "model": MODEL_ALIAS, "choices": [{"text": text, "index": 0,
                                                          "finish_reason": "stop",
                                                          "logprobs": None}],
                       "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})


def faults(s: dict[str, str]) -> list[Fault]:
    f = forms(s)
    filler = "upstream said: " + "x" * 90  # the secret starts before the old 120-char cut
    return [
        # the request headers echoed: Authorization: Basic base64(user:password)
        Fault.echo_headers(401),
        # a long non-JSON body with the raw key crossing the old cut
        Fault.status(400, body=f"{filler}{s['key']} trailing text"),
        # the password across the cut, then its encodings and the key's
        Fault.status(400, body=f"{filler[:-20]}{s['password']} {f['password quote']} "
                               f"{f['key base64']} {f['key quote']} {f['key quote_plus']}"),
        # a 200 whose answer repeats the secrets: it reaches the cache and the replay files
        Fault.status(200, body=completion(
            f"The answer is 3. {s['key']} {f['basic auth']} {f['key quote_plus']} "
            f"{f['password quote_plus']} {f['user:password']}")),
    ]


@pytest.fixture
def bad_endpoint():
    """A FaultProxy whose upstream is never reached: every request gets an injected fault."""
    p = FaultProxy(f"http://127.0.0.1:{free_port()}")
    p.always = Fault.status(400, body="no more faults queued")
    try:
        yield p
    finally:
        p.close()


def write_questions(path: Path, start: int, n: int) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": f"What is {i} + {i + 1}?",
                                        "answer": str(2 * i + 1)}) + "\n"
                            for i in range(start, start + n)))
    return path


def test_no_form_of_a_secret_reaches_anything_coe_writes(bad_endpoint, tmp_path):
    s = planted()
    secret_forms = forms(s)
    url = f"http://{s['user']}:{quote(s['password'], safe='')}@127.0.0.1:{bad_endpoint.port}/v1"
    pool = write_pool(tmp_path, [openai_expert("leaky", url, api_key_env="COE_TEST_KEY",
                                               max_concurrency=1, max_retries=0)])
    env = {"COE_TEST_KEY": s["key"], "COE_CACHE_DIR": str(tmp_path / "coe-cache"),
           "OPENAI_LOG": "debug"}

    bad_endpoint.inject(*faults(s))
    out = tmp_path / "out.jsonl"
    run = run_cli("run", write_questions(tmp_path / "q.jsonl", 0, 4), "-c", pool, "-o", out,
                  env=env)
    assert run.returncode == 4, run.stderr
    bad_endpoint.inject(*faults(s))
    ev = run_cli("eval", write_questions(tmp_path / "qe.jsonl", 10, 4), "-c", pool,
                 "-o", tmp_path / "eval", "--record", tmp_path / "record", "-q", "--no-plots",
                 "-s", "single:*", "--val-fraction", "0", env=env)
    assert ev.returncode in (0, 4), ev.stderr
    assert (tmp_path / "eval" / "report.json").exists()
    assert (tmp_path / "record" / "replay" / "leaky.jsonl").exists()
    assert (tmp_path / "cache.sqlite").exists()

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    errors = [r["responses"][0]["error"] for r in rows if r["responses"][0]["error"]]
    found = {f"run error {i}": leaks(e, secret_forms) for i, e in enumerate(errors)}
    found.update({f"{name} {stream}": leaks(text, secret_forms)
             for name, proc in (("run", run), ("eval", ev))
             for stream, text in (("stdout", proc.stdout), ("stderr", proc.stderr))})
    found.update({str(p.relative_to(tmp_path)): leaks(p.read_bytes(), secret_forms)
                  for p in tmp_path.rglob("*") if p.is_file() and p.name != "pool.yaml"})
    leaked = {k: v for k, v in found.items() if v}
    assert not leaked, "\n".join(f"{k}: {', '.join(v)}" for k, v in leaked.items())
    assert len(found) > 8  # answers, cache (+wal), report, replay files, ... were all read

    # the faults really carried the secrets: Basic auth from user:password@ went out (the
    # openai client's Bearer key is replaced by it) and came back in the echoed headers
    assert bad_endpoint.requests[0].header("Authorization") == f"Basic {secret_forms['basic auth']}"
    failed = [x for x in run.stderr.splitlines() if x.startswith("expert 'leaky' failed: ")]
    assert len(failed) == 1 and "***" in failed[0], run.stderr
    assert len(errors) == 3 and all("***" in e for e in errors), errors
    answered = [r["responses"][0]["text"] for r in rows if not r["responses"][0]["error"]]
    assert len(answered) == 1 and answered[0].startswith("The answer is 3. ***")


def test_every_form_of_every_secret_is_redacted():
    from coe.core.secrets import Secrets

    s = planted()
    secrets = Secrets()
    secrets.add(s["key"])
    secrets.add_url(f"http://{s['user']}:{quote(s['password'], safe='')}@h:1/v1?token=abcdefgh")
    for name, form in forms(s).items():
        text = f"before {form} after"
        assert secrets.redact(text) == "before *** after", name
    # a secret inside a longer base64 blob (any alignment) is hidden too
    for prefix in ("", "a", "ab"):
        blob = b64(f"{prefix}{s['key']}-tail")
        assert "***" in secrets.redact(blob) and blob[8:28] not in secrets.redact(blob)
    assert secrets.redact("GET /v1?token=abcdefgh") == "GET /v1?***"
    assert secrets.redact("GET /v1?x=abcdefgh") == "GET /v1?x=***"
    assert secrets.redact("plain text stays") == "plain text stays"
    # a token as the user of a URL (https://TOKEN@host) is one; a short user is not
    secrets.add_url("https://ghp_0123456789abcdef@h/v1")
    secrets.add_url("http://bob@h/v1")
    assert secrets.redact("ghp_0123456789abcdef bob") == "*** bob"
    secrets.add("EMPTY")  # a placeholder key (vLLM's convention) is no secret: answers stay
    assert secrets.redact("EMPTY") == "EMPTY"


def test_a_secret_split_across_streamed_pieces_never_goes_out():
    """A streamed answer cut anywhere (one, two or many cuts, inside any form of a secret):
    no piece let out holds any part of a form that later turns out whole, and the pieces
    joined are the redacted whole text."""
    from coe.core.secrets import Secrets

    s = planted()
    secrets = Secrets()
    secrets.add(s["key"])
    secrets.add_url(f"http://{s['user']}:{quote(s['password'], safe='')}@h:1/v1")
    secret_forms = forms(s)
    text = (f"Sure. The key is {s['key']}, encoded {secret_forms['key base64']}; the login is "
            f"{secret_forms['user:password']} ({secret_forms['basic auth']}). Done.")
    whole = secrets.redact(text)
    assert not leaks(whole, secret_forms)

    def streamed(cuts: list[int]) -> list[str]:
        hidden = secrets.stream()
        bounds = [0, *cuts, len(text)]
        out = [hidden.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
        return [*out, hidden.flush()]

    for i in range(1, len(text)):
        for cuts in ([i], [i, min(i + 7, len(text) - 1)]):
            out = streamed(sorted(set(cuts)))
            assert "".join(out) == whole, cuts
            for k in range(len(out)):  # what a client has seen after each piece
                assert not leaks("".join(out[:k + 1]), secret_forms), (cuts, k)
    one_by_one = streamed(list(range(1, len(text))))  # a piece per character
    assert "".join(one_by_one) == whole
    assert secrets.stream().feed("x") == ""  # held: it may begin a secret
    assert Secrets().stream().feed("no secret known: nothing held") == \
        "no secret known: nothing held"
