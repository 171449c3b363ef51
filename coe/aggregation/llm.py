"""An aggregator LLM reads the question and the experts' responses and writes the final answer
(Symbolic-MoE style). It asks for one generation per question (``requests``); they go through
the executor like any expert's, so they are batched (one load of the aggregator's weights for
the whole batch) and cached.

Which expert aggregates, for each question: the one chosen explicitly (``--aggregator-expert``,
else the yaml's ``aggregator.expert``), else the one the router suggests (the skill router's
best aggregator by the profiles), else the question's top recruit.

If the aggregator's own generation fails or gives no answer, the experts' vote stands in and
the result notes it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from coe.aggregation.base import Aggregator
from coe.aggregation.vote import vote
from coe.core.types import ExpertResponse, FinalAnswer, Generation, GenRequest, Question, Route
from coe.text.answers import response_from
from coe.text.prompts import build_request, format_question

MAX_RESPONSE_CHARS = 1500

SYSTEM = ("You are given a question and the responses of several experts. Some responses may "
          "be wrong. Weigh their reasoning, then give the single best final answer.")

_FINISH = {
    "mc": "Finish with a line 'Answer: X' where X is the letter of the correct option.",
    "number": "Finish with a line that starts with 'Answer:' followed by the final number only.",
    "text": "Finish with a line 'Answer: ...' giving the short final answer.",
}


#: a request that asks for JSON: the aggregator writes the final JSON (asked of its backend
#: too, as the experts were), and its answer is read as the experts' are (``json_answer``)
JSON_FINISH = "Reply with the final answer only, as JSON in the format asked for."


def aggregation_prompt(q: Question, responses: list[ExpertResponse]) -> str:
    parts = [f"Question: {format_question(q)}", "", "Expert responses:"]
    ok = [r for r in responses if r.error is None and r.text.strip()]
    for n, r in enumerate(ok, 1):
        text = r.text.strip()
        if len(text) > MAX_RESPONSE_CHARS:
            text = text[:MAX_RESPONSE_CHARS] + " ..."
        parts.append(f"[Expert {n}] {text}")
    wants_json = q.response_format is not None and q.response_format.wants_json
    parts += ["", JSON_FINISH if wants_json else _FINISH[q.answer_kind]]
    return "\n".join(parts)


class LLMAggregator(Aggregator):
    name = "llm"
    generates = True
    reads_text = True

    def __init__(self, config, expert: str | None = None,
                 strength: dict[str, float] | None = None):
        self.config = config
        self.expert = expert or config.aggregator.expert  # the explicit choice, if any
        if self.expert is not None:
            config.expert(self.expert)  # unknown name: one-line ConfigError
        self.strength = strength or {}

    @classmethod
    def from_config(cls, config, *, strength=None, expert=None) -> "LLMAggregator":
        return cls(config, expert=expert, strength=strength)

    def expert_for(self, route: Route) -> str:
        return self.expert or route.aggregator or route.experts[0].name

    def experts(self, routes: list[Route]) -> Counter:
        return Counter(self.expert_for(r) for r in routes)

    def requests(self, questions: list[Question], routes: list[Route],
                 responses: list[list[ExpertResponse]]) -> list[GenRequest]:
        out = []
        for q, route, resp in zip(questions, routes, responses):
            cfg = self.config.expert(self.expert_for(route))
            msgs = (("system", SYSTEM), ("user", aggregation_prompt(q, resp)))
            r = build_request(cfg, q, stage="aggregate", messages=msgs)
            if q.response_format is not None and q.response_format.wants_json:
                r = dataclasses.replace(r, response_format=q.response_format)
            out.append(r)
        return out

    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]],
                  generations: list[Generation] | None = None) -> list[FinalAnswer]:
        if generations is None or len(generations) != len(questions):
            raise ValueError("the llm aggregator needs the generations of its requests(), "
                             "one per question")
        out = []
        for q, route, resp, gen in zip(questions, routes, responses, generations):
            expert = self.expert_for(route)
            mine = response_from(expert, gen, q)
            answer, _, votes = vote(resp, self.strength, {r.name: r.weight for r in route.experts})
            note = ""
            if mine.answer is not None:
                answer = mine.answer
            else:
                note = ("aggregator failed: " + mine.error) if mine.error else "aggregator gave no answer"
                note += "; expert vote used"
            answered = [r for r in resp if r.answer is not None and r.error is None]
            agree = sum(1 for r in answered if r.answer == answer)
            conf = agree / len(answered) if answered else 0.0
            out.append(FinalAnswer(answer=answer, aggregator=f"llm:{expert}", confidence=conf,
                                   votes=votes, response=mine, note=note))
        return out
