"""The service's micro-batcher without a server: requests that arrive together form one batch,
the compositions of a batch share one plan, a request dropped before its batch is never sent,
a full queue refuses, and a router that fails fails only its own composition's requests."""

from __future__ import annotations

import asyncio

import pytest

from coe.apps.serve.batcher import Batcher, Cancelled, QueueFull
from coe.apps.serve.compositions import Compositions
from coe.core.config import load_config
from coe.core.types import Question
from coe.execution import build_executor
from tests.apps.eval.test_eval import ANSWERS, make_pool


def question(i: int, **extra) -> Question:
    return Question(id=f"q{i}", question=f"Test question {i}?", choices=["w", "x", "y", "z"],
                    **extra)


def serve(tmp_path, window: float = 0.05, **kw):
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg, serving=True)
    reports = []
    batcher = Batcher(ex, cfg, window=window, on_batch=reports.append, **kw)
    return cfg, ex, Compositions(cfg, ex), batcher, reports


def test_requests_arriving_together_are_one_batch_and_one_plan(tmp_path):
    cfg, ex, comps, batcher, reports = serve(tmp_path)

    async def main():
        batcher.start()
        jobs = [batcher.submit(comps.get("coe/all+vote"), question(0)),
                batcher.submit(comps.get("coe/category+single"), question(1, category="bio")),
                batcher.submit(comps.get("b"), question(2))]
        results = await asyncio.gather(*(j.future for j in jobs))
        await batcher.stop()
        return results

    results = asyncio.run(main())
    assert len(reports) == 1 and reports[0].size == 3
    # every replay loads once for the batch; the batch needed the four pool experts' weights
    assert reports[0].stats.loads == 4 and reports[0].distinct_weights == 4
    assert results[0].final_answer == "A" and len(results[0].responses) == 4
    assert results[1].final_answer == ANSWERS["c"][1]  # bio: c first
    assert [r.expert for r in results[2].responses] == ["b"]
    assert results[2].final_answer == ANSWERS["b"][2]
    ex.close()


def test_a_job_dropped_before_its_batch_is_never_sent(tmp_path):
    cfg, ex, comps, batcher, reports = serve(tmp_path)

    async def main():
        batcher.start()
        gone = batcher.submit(comps.get("a"), question(0))
        gone.cancel()
        kept = batcher.submit(comps.get("a"), question(1))
        result = await kept.future
        with pytest.raises(Cancelled):
            await gone.future
        await batcher.stop()
        return result

    assert asyncio.run(main()).final_answer == ANSWERS["a"][1]
    assert reports[0].size == 1 and reports[0].stats.requests == 1  # the live job only
    ex.close()


def test_a_full_queue_refuses_with_a_retry_hint(tmp_path):
    cfg, ex, comps, batcher, _ = serve(tmp_path, max_queue=1)

    async def main():
        batcher.start()  # its loop takes nothing before this coroutine first waits
        first = batcher.submit(comps.get("a"), question(0))
        with pytest.raises(QueueFull) as e:
            batcher.submit(comps.get("a"), question(1))
        await first.future
        await batcher.stop()
        return e.value.retry_after

    assert asyncio.run(main()) >= 1
    ex.close()


def test_a_failing_router_fails_only_its_composition(tmp_path):
    cfg, ex, comps, batcher, _ = serve(tmp_path)
    broken = comps.get("coe/category+vote")

    class Boom(type(broken.flow.router)):
        def route(self, questions):
            raise RuntimeError("router down")

    broken.flow.router.__class__ = Boom

    async def main():
        batcher.start()
        bad = batcher.submit(broken, question(0))
        good = batcher.submit(comps.get("coe/all+vote"), question(1))
        ok = await good.future
        with pytest.raises(RuntimeError, match="router down"):
            await bad.future
        await batcher.stop()
        return ok

    assert asyncio.run(main()).final_answer is not None
    ex.close()
