from coe.aggregation.vote import vote
from coe.pipeline.results import ExpertResponse


def r(expert, answer, error=None):
    return ExpertResponse(expert=expert, answer=answer, error=error)


def test_majority_and_confidence():
    ans, conf, votes = vote([r("a", "B"), r("b", "B"), r("c", "C")])
    assert ans == "B" and abs(conf - 2 / 3) < 1e-9 and votes == {"B": 2, "C": 1}


def test_failed_and_unanswered_responses_do_not_vote():
    ans, conf, _ = vote([r("a", None), r("b", "C"), r("c", "B", error="HTTP 500")])
    assert ans == "C" and conf == 1.0
    assert vote([r("a", None)]) == (None, 0.0, {})


def test_ties_go_to_route_weight_then_strength_never_list_order():
    rs = [r("weak", "A"), r("strong", "B")]
    assert vote(rs, strength={"weak": 0.3, "strong": 0.5})[0] == "B"
    assert vote(list(reversed(rs)), strength={"weak": 0.3, "strong": 0.5})[0] == "B"
    # the router's per-question weight outranks global strength
    assert vote(rs, strength={"weak": 0.3, "strong": 0.5}, weights={"weak": 1.0, "strong": 0.5})[0] == "A"
    # with nothing to go on, the answer itself decides: deterministic
    assert vote([r("x", "C"), r("y", "A")])[0] == vote([r("y", "A"), r("x", "C")])[0]
