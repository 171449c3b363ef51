"""``coe serve --executor ray`` as a real subprocess: models stay resident in their actors
(loads = distinct weights, /health and /metrics say where), a batch for other models runs while
one is busy, a worker killed with ``kill -9`` between or during requests is restarted and the
request answered (its in-flight generation made once more, stored once), and a server that
starts its own Ray keeps it private (every listener on 127.0.0.1) and stops on SIGTERM like
the local one: the batch in flight answered, exit 0, no stack dump.

Faults are driven by events: the fault proxy's N-th request, a process's exit."""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.conftest import cached_generations, write_jsonl
from tests.support.coe_server import CoeServer
from tests.support.openai_server import openai_expert, write_pool
from tests.support.proxy import Fault

pytestmark = [pytest.mark.server, pytest.mark.ray]
pytest.importorskip("ray")


def client(server: CoeServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)


def ask(server: CoeServer, qid: str, model: str = "coe"):
    return client(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"What is {qid[1:]} + 1?"}],
        extra_body={"coe": {"id": qid}})


def errors(reply) -> dict:
    return {r["expert"]: r["error"] for r in reply.model_extra["coe"]["responses"]}


def texts(reply) -> dict:
    return {r["expert"]: r["text"] for r in reply.model_extra["coe"]["responses"]}


def health(server: CoeServer) -> dict:
    status, body = server.get("/health")
    assert status == 200, body
    return json.loads(body)


def resident(server: CoeServer, label_part: str) -> dict:
    return next(r for r in health(server)["residency"] if label_part in r["model"])


def gone(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def replay_experts(tmp_path: Path, names=("memo", "echo")) -> list[dict]:
    for n in names:  # different files (equal ones would be one set of weights)
        write_jsonl(tmp_path / f"{n}.jsonl", [{"id": f"q{i}", "text": f"Answer: {i + 1}",
                                               "by": n} for i in range(8)])
    return [{"name": n, "backend": "replay", "model": f"{n}.jsonl"} for n in names]


def serve(cfg: Path, tmp_path: Path, env: dict, *args: str) -> CoeServer:
    return CoeServer(cfg, tmp_path, "--executor", "ray", *args,
                     env={"COE_CACHE_DIR": str(tmp_path), **env}).start()


def test_models_stay_resident_loads_are_distinct_weights(ray_cluster, tmp_path):
    cfg = write_pool(tmp_path, replay_experts(tmp_path))
    server = serve(cfg, tmp_path, {"RAY_ADDRESS": ray_cluster}, "--no-cache")
    try:
        for i in range(6):  # one after another: six batches
            assert ask(server, f"q{i}").model_extra["coe"]["final_answer"] == str(i + 1)
        assert server.metric("coe_batches_total") == 6
        assert server.metric("coe_model_loads_total") == 2  # memo's and echo's, once
        where = health(server)["residency"]
        assert sorted(r["model"] for r in where) == ["replay:echo.jsonl", "replay:memo.jsonl"]
        assert all(r["node"] == "127.0.0.1" and r["pid"] > 0 and r["bytes"] > 0
                   and not r["in_use"] for r in where)
        assert server.metric("coe_resident_model_bytes",
                             'model="replay:memo.jsonl",node="127.0.0.1"') == \
            resident(server, "memo")["bytes"]
    finally:
        assert server.stop() == 0, server.log()


def test_a_batch_for_another_model_runs_while_one_is_busy(ray_cluster, proxy, tmp_path):
    """Two pass-through requests, the second sent once the first is at the proxy, held there
    until the second's generation arrives: both are answered only if the second batch runs
    while the first is still running, on the other model's actor."""
    other_host = proxy.base_url.replace("127.0.0.1", "localhost")  # another load key
    cfg = write_pool(tmp_path, [openai_expert("a", proxy.base_url, max_retries=0),
                                openai_expert("b", other_host, max_retries=0)])
    server = serve(cfg, tmp_path, {"RAY_ADDRESS": ray_cluster})
    try:
        proxy.inject(Fault.hold(until_arrived=2))
        arrived = proxy.on_request(1)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, server, "q1", "a")
            assert arrived.wait(120)
            second = pool.submit(ask, server, "q2", "b")
            assert errors(first.result(180)) == {"a": None}
            assert errors(second.result(180)) == {"b": None}
        assert server.metric("coe_batches_total") == 2
    finally:
        assert server.stop() == 0, server.log()


def test_a_worker_killed_between_or_during_requests_is_restarted_and_answers(
        ray_cluster, proxy, tmp_path):
    """kill -9 of the process holding a model: between requests (the replay model, loaded
    again by its restarted process), then during one (the endpoint's request in flight at the
    proxy: its generation made once more, by the restarted process, and stored once)."""
    cfg = write_pool(tmp_path, [openai_expert("api", proxy.base_url, max_retries=0),
                                *replay_experts(tmp_path, ["memo"])])
    server = serve(cfg, tmp_path, {"RAY_ADDRESS": ray_cluster})
    try:
        assert errors(ask(server, "q0")) == {"api": None, "memo": None}
        memo = resident(server, "memo")["pid"]
        os.kill(memo, signal.SIGKILL)  # between requests
        assert gone(memo)
        reply = ask(server, "q1")
        assert errors(reply) == {"api": None, "memo": None}
        assert texts(reply)["memo"] == "Answer: 2"
        assert resident(server, "memo")["pid"] not in (memo, None)
        assert server.metric("coe_model_loads_total") == 3  # memo loaded again, once

        api = resident(server, "openai")["pid"]
        before = proxy.count
        killed = proxy.on_request(before + 1, lambda: os.kill(api, signal.SIGKILL))
        reply = ask(server, "q2")  # during: its request at the proxy
        assert killed.is_set() and errors(reply) == {"api": None, "memo": None}
        assert proxy.count == before + 2  # in flight when killed: asked once more
        prompts = [r.json()["prompt"] for r in proxy.requests[before:]]
        assert prompts[0] == prompts[1]
        assert resident(server, "openai")["pid"] != api
        # the endpoint's three generations, each stored once (a replay's are not cached)
        assert cached_generations(tmp_path / "cache.sqlite") == 3
    finally:
        assert server.stop() == 0, server.log()


def listeners(root: int) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket listening in process ``root`` or below it."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    sockets = {}  # inode -> (address, port)
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], line.split()[9]
            if state == "0A":  # LISTEN
                raw, port = local.split(":")
                packed = b"".join(bytes.fromhex(raw[i:i + 8])[::-1] for i in range(0, len(raw), 8))
                sockets[inode] = (str(ipaddress.ip_address(packed[:size])), int(port, 16))
    found = []
    for pid in tree:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in sockets:
                    found.append((*sockets[target[8:-1]], pid))
        except OSError:
            continue
    return found


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None
                              and ip.ipv4_mapped.is_loopback)


def test_its_own_ray_is_private_and_sigterm_drains_and_exits_0(proxy, tmp_path):
    """No RAY_ADDRESS: the server starts a Ray instance of its own."""
    cfg = write_pool(tmp_path, [openai_expert("api", proxy.base_url, max_retries=0)])
    server = CoeServer(cfg, tmp_path, "--executor", "ray", env={"COE_CACHE_DIR": str(tmp_path)})
    server.env.pop("RAY_ADDRESS", None)
    server.start()
    try:
        assert errors(ask(server, "q0", "api")) == {"api": None}
        found = listeners(server.proc.pid)
        ray_ports = [(a, p) for a, p, pid in found if pid != server.proc.pid]
        assert len(ray_ports) >= 3, found  # GCS, raylet, workers: started by this server
        assert all(loopback(a) for a, _, _ in found), found
        assert 8265 not in {p for _, p in ray_ports}  # no dashboard
        proxy.inject(Fault.hold(until_arrived=proxy.count + 2))
        arrived = proxy.on_request(proxy.count + 1)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            reply = pool.submit(ask, server, "q1", "api")  # in flight at the proxy, held
            assert arrived.wait(120)
            server.proc.send_signal(signal.SIGTERM)
            server.wait_for(lambda: urllib_refused(server), message="stopped accepting")
            release = urllib.request.Request(proxy.base_url + "/completions", method="POST",
                                             data=b"{}", headers={"Content-Type": "application/json"})
            try:  # the next request's arrival releases the held one
                urllib.request.urlopen(release, timeout=60).read()
            except OSError:
                pass
            assert errors(reply.result(180)) == {"api": None}
        assert server.proc.wait(120) == 0, server.log()
    finally:
        server.stop()
    log = server.log(400)
    assert "coe serve: stopped" in log and "SIGTERM received" not in log, log
    assert "Traceback" not in log and "core dumped" not in log, log


def urllib_refused(server: CoeServer) -> bool:
    try:
        urllib.request.urlopen(server.root + "/health", timeout=2)
    except urllib.error.HTTPError:
        return False  # answering (503 while draining)
    except OSError:
        return True
    return False
