"""When a busy model gets a second replica on Ray (``coe.execution.ray_actors``): only when one
more actor fits beside everything loaded, as the nodes' resources stand, without unloading any
model; otherwise the group waits for the busy one. The choice alone, on the real residency
policy and replay backends; the actors themselves are not started (the replicas' ``load`` is
a no-op here; ``tests/execution/test_ray_residency.py`` runs them on Ray)."""

from __future__ import annotations

import threading

from coe.backends import create_backend
from coe.core.config import load_config
from coe.execution.ray_actors import ModelActors
from coe.execution.ray_cluster import Nodes
from coe.execution.residency import Residency


class OneNode:  # what ray.nodes() reports: one node of two CPUs
    @staticmethod
    def nodes():
        return [{"NodeID": "n1", "Alive": True, "Resources": {"CPU": 2.0, "memory": 2.0**34}}]


def test_a_busy_model_gets_a_replica_only_if_one_more_fits_without_unloading(replay_pool):
    cfg = load_config(replay_pool[0])
    backends = {e.load_key(): create_backend(e, cfg.base_dir) for e in cfg.experts}
    alpha, beta = (cfg.expert(n).load_key() for n in ("alpha", "beta"))
    policy = Residency(max_resident=None, keep_resident=True)
    actors = ModelActors(lambda: None, cfg, backends, policy, runtime_env=None,
                         max_restarts=1, max_replicas=2)
    actors.nodes = Nodes(OneNode)  # replay models reserve a CPU each
    abort = threading.Event()

    def take(key):
        rk, tickets = actors.take(key, abort)
        slot = actors.slot(rk)
        slot.load = slot.unload = lambda: None
        policy.acquire(rk)
        for t in tickets:
            policy.served(t)
        return rk

    def done(rk):
        policy.done_with(rk)
        actors.free(rk)

    first = take(alpha)
    done(take(beta))  # beta loaded and idle: the two CPUs are taken
    got: list = []
    waiting = threading.Thread(target=lambda: got.append(take(alpha)))
    waiting.start()  # alpha is busy and a replica would need beta unloaded: it waits
    done(first)
    waiting.join(30)
    assert got == [(alpha, 0)] and policy.loaded() == {(alpha, 0), (beta, 0)}
    done(got[0])
    policy.release()  # both unloaded: room for two actors
    busy = take(alpha)
    assert take(alpha) == (alpha, 1) and busy == (alpha, 0)  # busy, and room: a replica
    assert sorted(r.label for r in policy.residents()) == [
        "replay:alpha.jsonl", "replay:alpha.jsonl (replica 2)"]
