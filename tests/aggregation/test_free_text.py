"""Free text is answered and aggregated whole: consensus by meaning, select by number, fuse."""

import numpy as np
import pytest

from coe.aggregation.consensus import consensus
from coe.aggregation.llm import FUSE_SYSTEM, SELECT_SYSTEM, LLMAggregator, shuffled
from coe.aggregation.vote import TextConsensus, VoteAggregator
from coe.apps.serve.shape import pick
from coe.core.config import parse_config
from coe.core.types import (
    ExpertResponse,
    FinalAnswer,
    Generation,
    Question,
    QuestionResult,
    Recruit,
    Route,
)
from coe.text.answers import extract_answer, free_text, gold_answer
from coe.text.prompts import build_request

PLANTS = [
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide "
    "to make glucose and release oxygen.",
    "Plants make their own food through photosynthesis: chlorophyll captures light energy, "
    "which turns CO2 and water into sugar, giving off oxygen.",
    "In photosynthesis, light energy is converted to chemical energy; plants take in carbon "
    "dioxide and water and produce glucose and oxygen.",
]
BREAD = ("To bake bread, mix flour, water, yeast and salt, knead the dough, let it rise, then "
         "bake it at 220 C for 30 minutes.")


def resp(expert: str, text: str, q: Question, error: str | None = None) -> ExpertResponse:
    return ExpertResponse(expert=expert, text=text, error=error,
                          answer=None if error else extract_answer(text, q))


def route(*names: str, weights: dict[str, float] | None = None) -> Route:
    weights = weights or {}
    return Route(question_id="1", experts=[Recruit(name=n, weight=weights.get(n, 1.0))
                                           for n in names])


# -- consensus over embeddings -------------------------------------------------------------

def test_the_most_central_answer_of_the_heaviest_cluster_wins():
    v = np.array([[1.0, 0.0], [0.9, 0.1], [0.95, 0.05], [0.0, 1.0]])
    c = consensus(v, threshold=0.9)
    assert c.clusters == [[0, 1, 2], [3]] and c.winner == 2  # 2 sits between 0 and 1
    assert c.agreement == pytest.approx(0.75)
    # weight, not headcount: one expert weighted 4 outweighs three weighted 1
    c = consensus(v, weights=np.array([1, 1, 1, 4.0]), threshold=0.9)
    assert c.clusters[0] == [3] and c.winner == 3


def test_no_answers_no_winner_and_an_empty_answer_joins_nothing():
    assert consensus(np.zeros((0, 3))).winner is None
    c = consensus(np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.01]]), threshold=0.9)
    assert c.clusters == [[1, 2], [0]]


# -- what is free text ----------------------------------------------------------------------

def test_free_text_is_declared_or_an_open_request_answered_without_an_answer_line():
    declared = Question(id="1", question="Explain photosynthesis.", kind="free")
    open_ = Question(id="2", question="Explain photosynthesis.")
    graded = Question(id="3", question="What is 12 + 7?", answer="19")
    assert free_text(declared, ["Answer: 4"])  # declared wins
    assert free_text(open_, PLANTS) and not free_text(open_, ["Answer: 19", "#### 19", "19"])
    assert not free_text(graded, PLANTS)  # a gold answer is graded as a short answer
    # a free answer is the whole text, never normalised, and never graded by matching
    assert extract_answer("  The Cat sat.\nOn a mat!  ", declared) == "The Cat sat.\nOn a mat!"
    assert gold_answer(declared.model_copy(update={"answer": "a reference"})) is None


def test_open_and_free_requests_are_sent_as_written_graded_ones_ask_for_the_answer_line():
    pool = parse_config({"experts": [{"name": "a", "backend": "replay", "model": "a.jsonl",
                                      "prompt_format": "chat"}]})
    cfg = pool.expert("a")
    for q in (Question(id="1", question="Write a haiku about rain."),
              Question(id="2", question="Write a haiku about rain.", kind="free")):
        assert build_request(cfg, q).messages[-1].text == "Write a haiku about rain."
    graded = Question(id="3", question="What is 12 + 7?", answer="19")
    assert "Answer:" in build_request(cfg, graded).messages[-1].text


# -- the vote on free text: by meaning, the whole text ---------------------------------------

def test_vote_on_free_text_returns_the_whole_central_answer_and_who_agreed():
    q = Question(id="1", question="Explain photosynthesis in one sentence.")
    responses = [resp("a", PLANTS[0], q), resp("b", BREAD, q), resp("c", PLANTS[1], q),
                 resp("d", PLANTS[2], q), resp("e", "", q, error="timed out")]
    [final] = VoteAggregator().aggregate([q], [route("a", "b", "c", "d", "e")], [responses])
    assert final.answer in PLANTS  # a whole answer, not a normalised fragment
    assert sorted(final.clusters[0]) == ["a", "c", "d"] and final.clusters[1:] == [["b"]]
    assert final.confidence == pytest.approx(0.75) and "free text" in final.note
    # the server's content is that expert's response, whole
    result = QuestionResult(id="1", question=q.question, route=route("a", "b", "c", "d"),
                            responses=responses, final_answer=final.answer,
                            aggregator="vote", confidence=final.confidence,
                            clusters=final.clusters)
    assert pick(result).text == final.answer


def test_vote_on_short_answers_is_unchanged():
    q = Question(id="1", question="What is 12 + 7?")
    responses = [resp("a", "Answer: 19", q), resp("b", "Answer: 19", q), resp("c", "Answer: 20", q)]
    [final] = VoteAggregator().aggregate([q], [route("a", "b", "c")], [responses])
    assert final.answer == "19" and final.votes == {"19": 2, "20": 1} and final.clusters == []


# -- the llm aggregator on free text: select by number, fuse --------------------------------

def pool(mode: str | None):
    experts = [{"name": n, "backend": "replay", "model": f"{n}.jsonl", "prompt_format": "chat"}
               for n in ("a", "b", "c", "judge")]
    return parse_config({"experts": experts, "aggregator": {"kind": "llm", "expert": "judge",
                                                            **({"mode": mode} if mode else {})}})


def test_select_shows_the_candidates_shuffled_and_takes_the_one_it_names():
    q = Question(id="1", question="Explain photosynthesis in one sentence.", kind="free")
    responses = [resp("a", PLANTS[0], q), resp("b", BREAD, q), resp("c", PLANTS[1], q)]
    agg = LLMAggregator(pool("select"))
    order = shuffled(q, 3)
    assert sorted(order) == [0, 1, 2] and order == shuffled(q, 3)  # seeded by the question
    [req] = agg.requests([q], [route("a", "b", "c")], [responses])
    assert req.expert == "judge" and req.messages[0].text == SELECT_SYSTEM
    shown = req.messages[-1].text
    assert [shown.index(responses[i].text) for i in order] == sorted(
        shown.index(r.text) for r in responses)  # in the shuffled order
    want = order.index(2) + 1  # the number c's answer is shown under
    [final] = agg.aggregate([q], [route("a", "b", "c")], [responses],
                            [Generation(text=f"{want}", completion_tokens=1)])
    assert final.answer == PLANTS[1] and final.aggregator == "llm:judge"
    assert "c's answer" in final.note
    # no number in range: the vote by meaning stands in, and says so
    [final] = agg.aggregate([q], [route("a", "b", "c")], [responses],
                            [Generation(text="all are good", completion_tokens=3)])
    assert final.answer in PLANTS and "expert vote used" in final.note


def test_fuse_is_the_default_for_free_text_and_its_whole_text_is_the_answer():
    q = Question(id="1", question="Explain photosynthesis in one sentence.")
    responses = [resp("a", PLANTS[0], q), resp("c", PLANTS[1], q)]
    agg = LLMAggregator(pool(None))
    [req] = agg.requests([q], [route("a", "c")], [responses])
    assert req.messages[0].text == FUSE_SYSTEM and PLANTS[1] in req.messages[-1].text
    fused = "Plants turn light, water and CO2 into sugar and oxygen.\n\nThat is photosynthesis."
    [final] = agg.aggregate([q], [route("a", "c")], [responses],
                            [Generation(text=fused, completion_tokens=20)])
    assert final.answer == fused and final.response.answer == fused
    result = QuestionResult(id="1", question=q.question, route=route("a", "c"),
                            responses=responses, final_answer=final.answer,
                            aggregator=final.aggregator, confidence=0.0,
                            aggregator_response=final.response)
    assert pick(result) is final.response  # served whole
    # a failed aggregator: the vote by meaning stands in
    [final] = agg.aggregate([q], [route("a", "c")], [responses],
                            [Generation(error="timed out")])
    assert final.answer in PLANTS[:2] and "aggregator failed: timed out" in final.note


def test_a_short_answer_question_keeps_the_answer_mode():
    q = Question(id="1", question="What is 12 + 7?", answer="19")
    responses = [resp("a", "Answer: 19", q), resp("c", "Answer: 20", q)]
    agg = LLMAggregator(pool(None))
    [final] = agg.aggregate([q], [route("a", "c")], [responses],
                            [Generation(text="12 + 7 = 19\nAnswer: 19")])
    assert final.answer == "19" and isinstance(final, FinalAnswer) and final.clusters == []


def test_threshold_comes_from_the_yaml():
    cfg = parse_config({"experts": [{"name": "a", "backend": "replay", "model": "a.jsonl"}],
                        "aggregator": {"kind": "vote", "threshold": 0.6}})
    assert TextConsensus.from_config(cfg).threshold == 0.6


@pytest.mark.parametrize("aggregator, words", [
    ({"kind": "vote", "mode": "fuse"}, "mode is the llm aggregator's"),
    ({"kind": "single", "threshold": 0.5}, "threshold is the vote's"),
])
def test_a_field_another_aggregator_kind_would_ignore_is_refused(aggregator, words):
    from coe.core.errors import ConfigError

    with pytest.raises(ConfigError, match=words):
        parse_config({"experts": [{"name": "a", "backend": "replay", "model": "a.jsonl"}],
                      "aggregator": aggregator})


def test_the_learned_aggregators_fallback_votes_at_the_yamls_threshold():
    from coe.aggregation.learned import LearnedAggregator

    cfg = parse_config({"experts": [{"name": "a", "backend": "replay", "model": "a.jsonl"}],
                        "aggregator": {"kind": "learned", "threshold": 0.6}})
    agg = LearnedAggregator.from_config(cfg)
    assert agg.unavailable and agg.vote.text.threshold == 0.6
