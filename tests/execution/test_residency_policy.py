"""The one residency policy, alone: what may be loaded, what is unloaded to make room (least
recently used idle first, never one another caller is queued for), what a server keeps."""

from __future__ import annotations

import threading

import pytest

from coe.execution.residency import Residency, Slot

GB = 1 << 30


def slots(policy: Residency, sizes: dict[str, float], log: list) -> None:
    for name, gb in sizes.items():
        policy.add(name, Slot(name, lambda n=name: log.append(("load", n)),
                              lambda n=name: log.append(("unload", n)),
                              holds_weights=gb > 0, bytes=int(gb * GB)))


def use(policy: Residency, key: str) -> float | None:
    seconds = policy.acquire(key)
    policy.done_with(key)
    return seconds


def test_a_budget_keeps_what_fits_and_evicts_the_least_recently_used():
    log: list = []
    p = Residency(max_resident=None, memory_gb=3)
    slots(p, {"a": 1, "b": 1, "c": 1.5}, log)
    use(p, "a"), use(p, "b"), use(p, "a")  # b is now the least recently used
    assert use(p, "a") is None  # already loaded: no load
    use(p, "c")
    assert log == [("load", "a"), ("load", "b"), ("unload", "b"), ("load", "c")]
    assert [r.label for r in p.residents()] == ["a", "c"]
    assert p.resident_bytes() == int(2.5 * GB)


def test_a_model_alone_is_loaded_even_over_the_budget_and_endpoints_count_nothing():
    log: list = []
    p = Residency(max_resident=1, memory_gb=1)
    slots(p, {"huge": 5, "api": 0}, log)
    use(p, "huge"), use(p, "api")
    assert {r.label for r in p.residents()} == {"huge", "api"}


def test_a_model_someone_is_queued_for_is_not_evicted_first():
    log: list = []
    p = Residency(max_resident=1)
    slots(p, {"a": 1, "b": 1}, log)
    use(p, "a")
    ticket = p.queue("a")  # another caller is about to use a
    done = threading.Event()

    def wants_b():
        use(p, "b")
        done.set()

    t = threading.Thread(target=wants_b)
    t.start()
    assert not done.wait(0.2)  # b waits: a is kept for its queued caller
    use(p, "a")
    p.served(ticket)
    t.join(5)
    assert done.is_set() and log[-2:] == [("unload", "a"), ("load", "b")]


def test_release_keeps_what_is_in_use_and_unload_all_frees_everything():
    log: list = []
    p = Residency(max_resident=None, keep_resident=True)
    slots(p, {"a": 1, "b": 1}, log)
    use(p, "a")
    p.acquire("b")  # in use
    p.release()
    assert [r.label for r in p.residents()] == ["b"] and p.keep_resident
    p.done_with("b")
    p.unload_all()
    assert p.residents() == []


def test_a_broken_model_is_unloaded_and_a_failed_load_leaves_nothing():
    p = Residency(max_resident=2)

    def fail():
        raise RuntimeError("no memory")

    p.add("bad", Slot("bad", fail, lambda: None))
    with pytest.raises(RuntimeError):
        p.acquire("bad")
    assert p.residents() == []
    log: list = []
    slots(p, {"a": 1}, log)
    p.acquire("a")
    p.done_with("a", broken=True)
    assert p.residents() == [] and log == [("load", "a"), ("unload", "a")]


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Residency(max_resident=0)
    with pytest.raises(ValueError):
        Residency(memory_gb=0)


def test_what_does_not_fit_on_the_nodes_evicts_the_least_recently_used_idle_model():
    """``fits`` (the Ray executor's nodes) bounds what is loaded as a budget does; ``room_for``
    says whether one more fits without unloading anything (how a busy model gets a replica)."""
    log: list = []
    gpus = {"a": 1, "b": 1, "c": 2}
    p = Residency(max_resident=None, fits=lambda keys: sum(gpus[k] for k in keys) <= 2)
    slots(p, {"a": 1, "b": 1, "c": 1}, log)
    use(p, "a")
    assert p.room_for("b") and not p.room_for("c")
    use(p, "b"), use(p, "a")  # b is the least recently used; c needs both GPUs
    assert not p.room_for("c")
    use(p, "c")
    assert log == [("load", "a"), ("load", "b"), ("unload", "b"), ("unload", "a"),
                   ("load", "c")]
    assert p.loaded() == {"c"}


def test_ray_nodes_pack_actors_where_they_run_and_the_rest_first_fit():
    from coe.core.config import Resources
    from coe.execution.ray_cluster import Nodes, demand

    class Cluster:  # what ray.nodes() reports: two nodes of 2 GPUs and 8 GiB each
        @staticmethod
        def nodes():
            return [{"NodeID": n, "Alive": True,
                     "Resources": {"CPU": 4.0, "GPU": 2.0, "memory": 8.0 * GB}}
                    for n in ("n1", "n2")] + [{"NodeID": "gone", "Alive": False,
                                               "Resources": {"GPU": 8.0}}]

    nodes = Nodes(Cluster)
    one = demand(Resources(num_cpus=1, num_gpus=1), 3 * GB)
    two = demand(Resources(num_cpus=1, num_gpus=2), 0)
    assert one == {"CPU": 1, "GPU": 1, "memory": 3 * GB}
    assert nodes.fits([("n1", one), ("n2", one), (None, one), (None, one)])
    assert not nodes.fits([("n1", one), ("n2", one), (None, two)])  # 2 GPUs on no one node
    assert nodes.fits([("n1", one), ("n1", one), (None, two)])
    assert not nodes.fits([(None, one), (None, one), (None, one)] * 2)  # 6 x 3 GiB > 2 x 8
    assert nodes.infeasible({"GPU": 4}, {"GPU": 4}) == (
        "needs GPU 4 on one node, which no node of the Ray cluster has (largest: GPU 2)")
    assert nodes.infeasible({"CPU": 1, "memory": 9 * GB}, {"CPU": 1}) == (
        "needs CPU 1, memory 9.0 GiB on one node, which no node of the Ray cluster has "
        "(largest: CPU 4, memory 8.0 GiB)")
