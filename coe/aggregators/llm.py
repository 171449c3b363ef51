"""An aggregator LLM reads the question and the experts' responses and writes the final answer
(Symbolic-MoE style). Its generations go through the executor like any expert's, so they are
batched (one load of the aggregator's weights for the whole batch) and cached.

If the aggregator's own generation fails or gives no answer, the experts' vote stands in and
the result notes it.
"""

from __future__ import annotations

from coe.aggregators.base import Aggregator
from coe.aggregators.vote import vote
from coe.prompts import build_request, format_question
from coe.questions import Question
from coe.results import ExpertResponse, FinalAnswer, response_from
from coe.routers.base import Route

MAX_RESPONSE_CHARS = 1500

SYSTEM = ("You are given a question and the responses of several experts. Some responses may "
          "be wrong. Weigh their reasoning, then give the single best final answer.")

_FINISH = {
    "mc": "Finish with a line 'Answer: X' where X is the letter of the correct option.",
    "number": "Finish with a line that starts with 'Answer:' followed by the final number only.",
    "text": "Finish with a line 'Answer: ...' giving the short final answer.",
}


def aggregation_prompt(q: Question, responses: list[ExpertResponse]) -> str:
    parts = [f"Question: {format_question(q)}", "", "Expert responses:"]
    ok = [r for r in responses if r.error is None and r.text.strip()]
    for n, r in enumerate(ok, 1):
        text = r.text.strip()
        if len(text) > MAX_RESPONSE_CHARS:
            text = text[:MAX_RESPONSE_CHARS] + " ..."
        parts.append(f"[Expert {n}] {text}")
    parts += ["", _FINISH[q.answer_kind]]
    return "\n".join(parts)


class LLMAggregator(Aggregator):
    name = "llm"

    def __init__(self, config, executor, expert: str | None = None,
                 strength: dict[str, float] | None = None):
        self.config = config
        self.executor = executor
        self.expert = expert or config.aggregator.expert
        self.strength = strength or {}

    def _expert_for(self, route: Route) -> str:
        return route.aggregator or self.expert or route.experts[0].name

    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]]) -> list[FinalAnswer]:
        requests = []
        for q, route, resp in zip(questions, routes, responses):
            cfg = self.config.expert(self._expert_for(route))
            msgs = (("system", SYSTEM), ("user", aggregation_prompt(q, resp)))
            requests.append(build_request(cfg, q, stage="aggregate", messages=msgs))
        gens = self.executor.run(requests)
        out = []
        for q, route, resp, req, gen in zip(questions, routes, responses, requests, gens):
            mine = response_from(req.expert, gen, q)
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
            out.append(FinalAnswer(answer=answer, aggregator=f"llm:{req.expert}", confidence=conf,
                                   votes=votes, response=mine, note=note))
        return out
