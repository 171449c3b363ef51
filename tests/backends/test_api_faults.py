"""Issue 5, API faults and secrets: real faults against the real local OpenAI-compatible server.

Faults come from the server itself (refused, stopped, killed) or from ``tests/proxy.py``, a
loopback proxy in front of it that answers some requests with 429/500/a truncated or non-JSON
body/a closed connection, holds some unanswered until the client gives up, and forwards the
rest. The client is the real ``openai``
client; its own retry loop (backoff, ``Retry-After``, ``max_retries``) is what is tested,
by counting the requests that reach the proxy (and, for the backoff, the least time between
them). Every fault is set off by an event the proxy sees (its N-th request arriving, another
request arriving or ending, the client closing a connection), never by a race against a delay.

Rule in every test: the failing expert is named, its finished generations are kept, and the
other experts' answers are all there.
"""

from __future__ import annotations

import json
import logging
import traceback
import uuid
from pathlib import Path

import pytest

from coe.apps.api import Orchestrator
from coe.core.config import load_config
from coe.core.errors import ConfigError, ExpertError
from tests.support.openai_server import (
    arithmetic_questions,
    cached_generations,
    free_port,
    openai_expert,
    run_cli,
    write_pool,
)
from tests.support.proxy import Fault


def backup_expert(tmp_path: Path, questions) -> dict:
    """A replay expert that answers every question right: the expert the job continues with."""
    path = tmp_path / "backup.jsonl"
    path.write_text("".join(json.dumps({"id": q.id, "text": f"Answer: {q.answer}"}) + "\n"
                            for q in questions))
    return {"name": "backup", "backend": "replay", "model": path.name}


def write_questions(tmp_path: Path, questions) -> Path:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"id": q.id, "question": q.question, "answer": q.answer})
                            + "\n" for q in questions))
    return path


def one_line(msg: str) -> bool:
    return bool(msg) and "\n" not in msg and len(msg) <= 300


def assert_continued_without(run, failing: str, questions) -> None:
    """Every question was answered by the other experts; the route records the failure."""
    assert set(run.stats.failures) == {failing}
    for q, r in zip(questions, run.results):
        assert set(r.route.failed) == {failing}
        others = [x for x in r.responses if x.expert != failing]
        assert others and all(x.error is None for x in others)
        # the vote is over the experts that answered (the backup always answers right)
        assert r.final_answer in {x.answer for x in others} and q.answer in r.votes
        assert sum(r.votes.values()) == sum(x.answer is not None for x in others)


# -- the server is not there -------------------------------------------------------------------

def test_connection_refused_is_reported_and_the_other_experts_answer(openai_server, tmp_path):
    qs = arithmetic_questions(2)
    gone = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    pool = write_pool(tmp_path, [openai_expert("gone", gone, max_retries=1),
                                 openai_expert("live", openai_server.base_url),
                                 backup_expert(tmp_path, qs)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs, output=tmp_path / "out.jsonl")
    assert_continued_without(run, "gone", qs)
    msg = run.stats.failures["gone"]
    assert msg.startswith(f"connection to {gone} failed after 1 retry: ConnectError")
    assert one_line(msg)
    live = [next(x for x in r.responses if x.expert == "live") for r in run.results]
    assert all(x.text and x.completion_tokens > 0 for x in live)
    assert run.stats.generations == 2 + 2 and run.stats.failed_generations == 2
    assert cached_generations(tmp_path / "cache.sqlite") == 2  # the live expert's, kept
    rows = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
    assert [set(r["route"]["failed"]) for r in rows] == [{"gone"}, {"gone"}]


def test_server_killed_mid_job_keeps_finished_generations(fresh_openai_server, fresh_proxy,
                                                           tmp_path):
    """The server is killed (SIGKILL) the moment the victim's 3rd request reaches it; the
    proxy, which is the server's address for the client, goes down with it (that request's
    connection dropped, every later one refused). One request at a time, and each generation
    is stored before the next request is sent: exactly the first 2 are kept."""
    server, proxy = fresh_openai_server, fresh_proxy
    qs = arithmetic_questions(4)
    cache = tmp_path / "cache.sqlite"
    pool = write_pool(tmp_path, [openai_expert("victim", proxy.base_url, max_concurrency=1,
                                               max_retries=1, prompt_format="chat",
                                               timeout=300.0),
                                 backup_expert(tmp_path, qs)])
    killed = proxy.on_request(3, lambda: server.stop(kill=True), then=Fault.down())
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs, output=tmp_path / "out.jsonl")
    assert killed.is_set() and not server.alive and not proxy.listening
    # the retry of the 3rd request was refused: it never reached the proxy
    assert proxy.count == 3 and [r.fault for r in proxy.requests] == [None, None, "down"]
    victim = [next(x for x in r.responses if x.expert == "victim") for r in run.results]
    assert [x.error is None for x in victim] == [True, True, False, False]
    assert all(x.text for x in victim[:2])
    assert cached_generations(cache) == 2 and run.stats.generations == 2 + len(qs)
    msg = run.stats.failures["victim"]
    assert msg == (f"connection to {proxy.base_url} failed after 1 retry: "
                   "ConnectError: All connection attempts failed")
    assert victim[2].error == msg and victim[3].error == f"not sent, endpoint down: {msg}"
    # the backup answered everything; the questions the victim missed record it
    for r, x in zip(run.results, victim):
        assert r.gold in r.votes and r.final_answer in r.votes
        assert set(r.route.failed) == ({"victim"} if x.error else set())
    assert len(open(tmp_path / "out.jsonl").readlines()) == len(qs)


# -- faults from the proxy: persistent -> capped retries, expert reported, job continues ------

PERSISTENT = [
    # id, fault, yaml overrides, requests that reach the proxy, error prefix
    ("429", Fault.status(429, retry_after=0.1), {}, 3, "HTTP 429 after 2 retries: Error code: 429"),
    ("500", Fault.status(500), {}, 3, "HTTP 500 after 2 retries: Error code: 500"),
    ("502-html", Fault.nonjson(502), {}, 3, "HTTP 502 after 2 retries: Error code: 502 - <html> <head>"),
    ("closed", Fault.close(), {}, 3, "connection to {url} failed after 2 retries: RemoteProtocolError"),
    ("truncated", Fault.truncate(), {}, 3,
     "connection to {url} failed after 2 retries: RemoteProtocolError: peer closed connection"),
    # held without an answer until the client gives up: only its 0.5 s timeout ends it
    ("timeout", Fault.hang(), {"timeout": 0.5}, 3, "timed out (0.5s) after 2 retries: {url}"),
    # a 200 whose body is not JSON is an answer, not a transient fault: not retried, and the
    # endpoint is not taken for down (each request fails on its own)
    ("200-not-json", Fault.nonjson(200), {}, 2, "response is not JSON: '<html> <head>"),
]


@pytest.mark.parametrize("fault,overrides,sent,prefix", [p[1:] for p in PERSISTENT],
                         ids=[p[0] for p in PERSISTENT])
def test_persistent_fault_is_capped_reported_and_job_continues(proxy, tmp_path, fault, overrides,
                                                               sent, prefix):
    qs = arithmetic_questions(2)
    proxy.always = fault
    pool = write_pool(tmp_path, [
        openai_expert("flaky", proxy.base_url, max_concurrency=1, max_retries=2, **overrides),
        backup_expert(tmp_path, qs)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs)
    assert_continued_without(run, "flaky", qs)
    # max_retries=2 caps the first request at 3 attempts; when the fault is a retryable one
    # the endpoint is then taken for down and the second request is never sent
    assert proxy.count == sent
    errors = [next(x for x in r.responses if x.expert == "flaky").error for r in run.results]
    first = prefix.format(url=proxy.base_url)
    assert errors[0].startswith(first), errors[0]
    assert run.stats.failures["flaky"] == errors[0] and all(one_line(e) for e in errors)
    if sent == 3:
        assert errors[1] == f"not sent, endpoint down: {errors[0]}"
    else:
        assert errors[1].startswith(first)
    assert run.stats.failed_generations == 2 and run.stats.generations == 2  # the backup's
    assert cached_generations(tmp_path / "cache.sqlite") == 0  # errors are never cached


def test_one_slow_request_does_not_take_a_working_endpoint_down(proxy, tmp_path):
    """A request that times out while others succeed is that request's failure only: the
    endpoint is not taken for down and the requests still queued are sent.

    Two slots, five questions; the order is made by the proxy, not by delays:
    1. the first request's real answer is held until the second has arrived, so it succeeds
       while the second is in flight;
    2. the second hangs unanswered until the client's timeout gives it up;
    3. the third (sent in the first's slot) is answered only once the hung one has ended (its
       answer kept alive meanwhile, so it cannot time out), so both slots are busy until the
       hung request fails and the last two are still queued then.
    The only clock is the client's own timeout; the server has to answer within it."""
    proxy.inject(Fault.hold(until_arrived=2), Fault.hang(), Fault.hold(until_ended=2))
    pool = write_pool(tmp_path, [openai_expert("busy", proxy.base_url, max_concurrency=2,
                                               max_retries=0, timeout=10.0)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(arithmetic_questions(5))
    errors = [r.responses[0].error for r in run.results]
    reqs = proxy.requests
    assert [r.fault for r in reqs] == ["hold", "hang", "hold", None, None], errors
    assert proxy.count == 5 and run.stats.generations == 4, errors
    assert sorted(e is None for e in errors) == [False, True, True, True, True]
    assert next(e for e in errors if e) == f"timed out (10s) after 0 retries: {proxy.base_url}"
    assert run.stats.failures == {"busy": next(e for e in errors if e)}
    # the order the holds made: 1 answered after 2 arrived, 3 answered after 2 ended, and 4
    # and 5 were sent although a request had timed out (no "not sent, endpoint down")
    hung = reqs[1]
    assert reqs[0].end > hung.start and reqs[2].end > hung.end and hung.status is None
    assert all(r.status == 200 for r in reqs[:1] + reqs[2:])


# -- faults from the proxy: transient -> the client's retry gets the real answer ---------------

TRANSIENT = [
    ("429", Fault.status(429, retry_after=0.2), {}),
    ("500", Fault.status(500), {}),
    ("502-html", Fault.nonjson(502), {}),
    ("closed", Fault.close(), {}),
    ("truncated", Fault.truncate(), {}),
    ("timeout", Fault.hang(), {"timeout": 5.0}),  # only the client's timeout ends it
]


@pytest.mark.parametrize("fault,overrides", [p[1:] for p in TRANSIENT], ids=[p[0] for p in TRANSIENT])
def test_transient_fault_is_retried_and_the_answer_kept(proxy, tmp_path, fault, overrides):
    proxy.inject(fault)  # only the first request breaks
    pool = write_pool(tmp_path, [openai_expert("flaky", proxy.base_url, **overrides)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(arithmetic_questions(1))
    assert run.stats.failures == {} and run.stats.generations == 1
    gen = run.results[0].responses[0]
    assert gen.error is None and gen.text and gen.completion_tokens > 0
    reqs = proxy.requests
    assert [r.fault for r in reqs] == [fault.kind, None]
    assert reqs[1].header("x-stainless-retry-count") == "1"  # the client's own retry
    assert cached_generations(tmp_path / "cache.sqlite") == 1


def test_backoff_honours_retry_after_then_grows_exponentially(proxy, tmp_path):
    """429 with Retry-After: 1.5 -> the client waits 1.5 s (not its own 0.5 s backoff); then
    two 500s without it -> the client's exponential backoff, 0.5 s * 2^n minus up to 25%
    jitter: at least 0.75 s, then at least 1.5 s.

    Only lower bounds are asserted, each measured from the moment the proxy started sending
    the fault (the client cannot have had it earlier) to the retry's arrival: a client can
    never retry *earlier* than Retry-After or its backoff floor, however fast or slow the
    machine is. An upper bound would measure the machine's scheduling, not the client."""
    proxy.inject(Fault.status(429, retry_after=1.5), Fault.status(500), Fault.status(500))
    pool = write_pool(tmp_path, [openai_expert("flaky", proxy.base_url, max_retries=3)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(arithmetic_questions(1))
    assert run.stats.failures == {} and run.results[0].responses[0].error is None
    reqs = proxy.requests
    assert [r.fault for r in reqs] == ["status", "status", "status", None]
    assert [r.status for r in reqs] == [429, 500, 500, 200]
    assert [r.header("x-stainless-retry-count") for r in reqs] == ["0", "1", "2", "3"]
    gaps = [b.start - a.sent for a, b in zip(reqs, reqs[1:])]
    floors = [1.5, 0.5 * 2 * 0.75, 0.5 * 4 * 0.75]  # Retry-After; backoff n=1, n=2 at -25%
    assert all(g >= f - 0.001 for g, f in zip(gaps, floors)), gaps  # 1 ms: clock rounding


# -- the command line --------------------------------------------------------------------------

def test_cli_reports_a_failing_expert_in_one_line_and_exits_nonzero(tmp_path):
    qs = arithmetic_questions(2)
    gone = f"http://127.0.0.1:{free_port()}/v1"
    pool = write_pool(tmp_path, [openai_expert("gone", gone, max_retries=1),
                                 backup_expert(tmp_path, qs)])
    out = tmp_path / "out.jsonl"
    proc = run_cli("run", write_questions(tmp_path, qs), "-c", pool, "-o", out, "-q")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("2 questions answered") and "failed: 2" in lines[0]
    assert lines[-1] == (f"expert 'gone' failed: connection to {gone} failed after 1 retry: "
                         "ConnectError: All connection attempts failed")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["final_answer"] for r in rows] == [q.answer for q in qs]  # the backup carried on
    assert all(set(r["route"]["failed"]) == {"gone"} for r in rows)


def test_cli_fail_fast_stops_with_one_error_line_and_keeps_finished_work(openai_server, tmp_path):
    qs = arithmetic_questions(2)
    gone = f"http://127.0.0.1:{free_port()}/v1"
    pool = write_pool(tmp_path, [openai_expert("live", openai_server.base_url),
                                 openai_expert("gone", gone, max_retries=0)])
    proc = run_cli("run", write_questions(tmp_path, qs), "-c", pool, "-q", "--fail-fast")
    assert proc.returncode == 4 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: expert 'gone': connection to {gone} failed after 0 retries: "
        "ConnectError: All connection attempts failed"]
    assert cached_generations(tmp_path / "cache.sqlite") == 2  # the live expert ran first


# -- secrets -----------------------------------------------------------------------------------

def _secret() -> str:
    return f"sk-coe-test-{uuid.uuid4().hex}"


def _files_containing(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_api_key_never_reaches_stderr_logs_output_or_cache(openai_server, proxy, tmp_path):
    key = _secret()
    qs = arithmetic_questions(2)
    # first request: an error whose body echoes the request headers (so the key) back;
    # second: the real server's answer
    proxy.inject(Fault.echo_headers(401))
    pool = write_pool(tmp_path, [openai_expert("keyed", proxy.base_url, api_key_env="COE_TEST_KEY",
                                               max_concurrency=1)])
    out = tmp_path / "out.jsonl"
    proc = run_cli("run", write_questions(tmp_path, qs), "-c", pool, "-o", out,
                   env={"COE_TEST_KEY": key, "OPENAI_LOG": "debug"})
    # the key was really used, and really sent back in the error body
    assert [r.header("Authorization") for r in proxy.requests] == [f"Bearer {key}"] * 2
    assert proc.returncode == 4, proc.stderr
    assert "openai._base_client" in proc.stderr  # the library's debug log was on
    failed = [x for x in proc.stderr.splitlines() if x.startswith("expert 'keyed' failed: ")]
    assert len(failed) == 1 and failed[0].startswith("expert 'keyed' failed: HTTP 401: ")
    assert "Bearer ***" in failed[0]  # the echoed header, redacted
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sum(r["responses"][0]["error"] is None for r in rows) == 1
    assert cached_generations(tmp_path / "cache.sqlite") == 1
    assert key not in proc.stderr and key not in proc.stdout
    assert _files_containing(tmp_path, key) == []  # answers, cache db (+wal), yaml, questions


def test_api_key_never_in_exceptions_or_python_logs(proxy, tmp_path, monkeypatch, caplog):
    key = _secret()
    monkeypatch.setenv("COE_TEST_KEY", key)
    proxy.always = Fault.echo_headers(500)  # retried, then reported, echoing the key each time
    qs = arithmetic_questions(2)
    pool = write_pool(tmp_path, [openai_expert("keyed", proxy.base_url, api_key_env="COE_TEST_KEY",
                                               max_concurrency=1, max_retries=1),
                                 backup_expert(tmp_path, qs)])
    caplog.set_level(logging.DEBUG)
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs, output=tmp_path / "out.jsonl")
    assert_continued_without(run, "keyed", qs)
    assert run.stats.failures["keyed"].startswith("HTTP 500 after 1 retry: ")
    assert "Bearer ***" in run.stats.failures["keyed"]
    with Orchestrator.from_yaml(pool, fail_fast=True) as orch, pytest.raises(ExpertError) as ei:
        orch.run(qs)
    assert ei.value.expert == "keyed" and "Bearer ***" in str(ei.value)
    assert all(r.header("Authorization") == f"Bearer {key}" for r in proxy.requests)
    assert proxy.count == 4  # 2 attempts per run; the second question never sent
    assert any(r.name.startswith("openai") for r in caplog.records)  # logging was captured
    texts = {
        "exception": "".join(traceback.format_exception(ei.value)) + repr(ei.value),
        "logs": caplog.text + "".join(str(r.args) for r in caplog.records),
        "results": "".join(r.model_dump_json() for r in run.results),
        "stats": repr(run.stats),
    }
    assert {name: key in text for name, text in texts.items()} == dict.fromkeys(texts, False)
    assert _files_containing(tmp_path, key) == []


def test_api_key_comes_only_from_the_named_environment_variable(proxy, tmp_path, monkeypatch):
    secret = _secret()
    # 1. a key written into the yaml is refused, and the message does not repeat it
    bad = write_pool(tmp_path, [openai_expert("inline", proxy.base_url, api_key=secret)],
                     name="bad.yaml")
    with pytest.raises(ConfigError) as ei:
        load_config(bad)
    assert "expert 'inline': field 'api_key': unknown field" in str(ei.value)
    assert secret not in str(ei.value)

    # 2. the named variable is unset: the expert is reported, nothing is sent, the job goes on
    monkeypatch.delenv("COE_UNSET_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # an ambient key is never a fallback
    qs = arithmetic_questions(1)
    pool = write_pool(tmp_path, [openai_expert("nokey", proxy.base_url, api_key_env="COE_UNSET_KEY"),
                                 backup_expert(tmp_path, qs)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs)
    assert run.stats.failures == {
        "nokey": "load failed: expert 'nokey': environment variable COE_UNSET_KEY is not set"}
    assert run.results[0].final_answer == qs[0].answer and proxy.count == 0

    # 3. no api_key_env: a placeholder goes out, not the ambient OPENAI_API_KEY
    proxy.always = Fault.status(400)  # answer at once; the request itself is what we look at
    pool = write_pool(tmp_path, [openai_expert("local", proxy.base_url)], name="local.yaml")
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs)
    assert run.stats.failures["local"].startswith("HTTP 400: ")  # not retried
    assert [r.header("Authorization") for r in proxy.requests] == ["Bearer no-key"]
