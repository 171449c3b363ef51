"""An aggregator LLM reads the question and the experts' responses and writes the final answer
(Symbolic-MoE style). It asks for one generation per question (``requests``); they go through
the executor like any expert's, so they are batched (one load of the aggregator's weights for
the whole batch) and cached.

Which expert aggregates, for each question: the one chosen explicitly (``--aggregator-expert``,
else the yaml's ``aggregator.expert``), else the one the router suggests (the skill router's
best aggregator by the profiles), else the question's top recruit.

Three modes (``aggregator.mode``):

- ``answer`` (the default for questions with a short answer): it writes the final answer,
  ending with the line the extraction reads;
- ``fuse`` (the default for free text, Mixture-of-Agents style): it writes one whole answer of
  its own from the candidates; that text is the final answer;
- ``select``: it names the best candidate by its number, the candidates shown in an order
  shuffled per question (seeded by the question's text, so a repeated request is the same
  generation, cached) against the position bias of LLM judges; the final answer is that
  candidate's, its whole text for free text.

If the aggregator's own generation fails or gives no answer (no candidate number), the
experts' vote stands in (by meaning, for free text) and the result notes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections import Counter

from coe.aggregation.base import Aggregator
from coe.aggregation.vote import TextConsensus, VoteAggregator, vote
from coe.core.types import ExpertResponse, FinalAnswer, Generation, GenRequest, Question, Route
from coe.text.answers import free_text, response_from
from coe.text.prompts import build_request, format_question

MAX_RESPONSE_CHARS = 1500
MAX_FREE_CHARS = 4000  # a free-text candidate is the whole answer, not reasoning to a line

SYSTEM = ("You are given a question and the responses of several experts. Some responses may "
          "be wrong. Weigh their reasoning, then give the single best final answer.")

_FINISH = {
    "mc": "Finish with a line 'Answer: X' where X is the letter of the correct option.",
    "number": "Finish with a line that starts with 'Answer:' followed by the final number only.",
    "text": "Finish with a line 'Answer: ...' giving the short final answer.",
    "free": "Give the final answer in full.",
}


#: a request that asks for JSON: the aggregator writes the final JSON (asked of its backend
#: too, as the experts were), and its answer is read as the experts' are (``json_answer``)
JSON_FINISH = "Reply with the final answer only, as JSON in the format asked for."


SELECT_SYSTEM = ("You are given a request and several candidate responses to it, numbered. "
                 "Decide which one answers the request best: correct, helpful and complete, "
                 "and no longer than it needs to be. Reply with its number only.")
FUSE_SYSTEM = ("You are given a request and the responses of several models to it. Some may be "
               "wrong, incomplete or padded. Write the best response to the request yourself: "
               "keep what is correct and useful in them, fix what is wrong, and do not mention "
               "the other responses.")
_NUMBER = re.compile(r"\d+")


def _answered(responses: list[ExpertResponse]) -> list[ExpertResponse]:
    return [r for r in responses if r.error is None and r.text.strip()]


def _cut(text: str, limit: int) -> str:
    text = text.strip()
    return text[:limit] + " ..." if len(text) > limit else text


def shuffled(q: Question, n: int) -> list[int]:
    """The order ``select`` shows ``n`` candidates in: shuffled, seeded by the question's
    text (not its id, which a server makes up per request)."""
    seed = int.from_bytes(hashlib.sha256(f"{q.question}\0{n}".encode()).digest()[:8], "big")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def select_prompt(q: Question, candidates: list[ExpertResponse], order: list[int]) -> str:
    parts = [f"Request: {format_question(q)}", "", "Candidate responses:"]
    for n, i in enumerate(order, 1):
        parts += [f"[{n}]", _cut(candidates[i].text, MAX_FREE_CHARS), ""]
    parts.append(f"Which response is best? Reply with one number from 1 to {len(order)}.")
    return "\n".join(parts)


def fuse_prompt(q: Question, responses: list[ExpertResponse], free: bool = True) -> str:
    parts = [f"Request: {format_question(q)}", "", "Responses:"]
    for n, r in enumerate(responses, 1):
        parts += [f"[{n}]", _cut(r.text, MAX_FREE_CHARS), ""]
    parts.append("Now write your response to the request.")
    if not free:  # a short answer: the line the extraction reads
        parts.append(_FINISH[q.answer_kind])
    return "\n".join(parts)


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
                 strength: dict[str, float] | None = None, mode: str | None = None):
        self.config = config
        self.expert = expert or config.aggregator.expert  # the explicit choice, if any
        if self.expert is not None:
            config.expert(self.expert)  # unknown name: one-line ConfigError
        self.strength = strength or {}
        self.mode = mode or config.aggregator.mode
        self.fallback = VoteAggregator(self.strength, TextConsensus.from_config(config))

    @classmethod
    def from_config(cls, config, *, strength=None, expert=None) -> "LLMAggregator":
        return cls(config, expert=expert, strength=strength)

    def expert_for(self, route: Route) -> str:
        return self.expert or route.aggregator or route.experts[0].name

    def experts(self, routes: list[Route]) -> Counter:
        return Counter(self.expert_for(r) for r in routes)

    def mode_for(self, q: Question, responses: list[ExpertResponse]) -> tuple[str, bool]:
        """(the mode for this question, whether its answers are free text)."""
        free = free_text(q, [r.text for r in responses if r.error is None])
        return self.mode or ("fuse" if free else "answer"), free

    def _messages(self, q: Question, resp: list[ExpertResponse]) -> tuple:
        mode, free = self.mode_for(q, resp)
        if mode == "select":
            ok = _answered(resp)
            return (("system", SELECT_SYSTEM),
                    ("user", select_prompt(q, ok, shuffled(q, len(ok)))))
        if mode == "fuse":
            return (("system", FUSE_SYSTEM), ("user", fuse_prompt(q, _answered(resp), free)))
        return (("system", SYSTEM), ("user", aggregation_prompt(q, resp)))

    def requests(self, questions: list[Question], routes: list[Route],
                 responses: list[list[ExpertResponse]]) -> list[GenRequest]:
        out = []
        for q, route, resp in zip(questions, routes, responses):
            cfg = self.config.expert(self.expert_for(route))
            r = build_request(cfg, q, stage="aggregate", messages=self._messages(q, resp))
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
        return [self._one(q, route, resp, gen)
                for q, route, resp, gen in zip(questions, routes, responses, generations)]

    def _fallback(self, q: Question, route: Route, resp: list[ExpertResponse], why: str,
                  name: str, mine: ExpertResponse) -> FinalAnswer:
        """The experts' vote (by meaning for free text) standing in, saying why."""
        f = self.fallback.one(q, route, resp)
        note = f"{why}; expert vote used" + (f" ({f.note})" if f.note else "")
        return f.model_copy(update={"aggregator": name, "response": mine, "note": note})

    def _one(self, q: Question, route: Route, resp: list[ExpertResponse],
             gen: Generation) -> FinalAnswer:
        expert = self.expert_for(route)
        mode, free = self.mode_for(q, resp)
        mine = response_from(expert, gen, q)
        name = f"llm:{expert}"
        failed = ("aggregator failed: " + mine.error) if mine.error else ""
        if mode == "select":
            ok = _answered(resp)
            order = shuffled(q, len(ok))
            picked = [int(m) for m in _NUMBER.findall(mine.text) if 1 <= int(m) <= len(ok)]
            if failed or not picked:
                return self._fallback(q, route, resp, failed or "aggregator named no candidate "
                                      f"from 1 to {len(ok)}", name, mine)
            chosen = ok[order[picked[0] - 1]]
            answer = chosen.text.strip() if free else chosen.answer
            return FinalAnswer(answer=answer, aggregator=name, response=mine,
                               confidence=round(1 / len(ok), 4),
                               note=f"select: candidate {picked[0]} of {len(ok)}, "
                                    f"{chosen.expert}'s answer")
        if mode == "fuse" and free:
            if failed or not mine.text.strip():
                return self._fallback(q, route, resp, failed or "aggregator wrote nothing",
                                      name, mine)
            text = mine.text.strip()
            return FinalAnswer(answer=text, aggregator=name, confidence=0.0,
                               response=mine.model_copy(update={"answer": text}),
                               note=f"fuse: written by {expert} from {len(_answered(resp))} "
                                    "answers")
        answer, _, votes = vote(resp, self.strength, {r.name: r.weight for r in route.experts})
        note = ""
        if mine.answer is not None:
            answer = mine.answer
        else:
            note = (failed or "aggregator gave no answer") + "; expert vote used"
        answered = [r for r in resp if r.answer is not None and r.error is None]
        agree = sum(1 for r in answered if r.answer == answer)
        conf = agree / len(answered) if answered else 0.0
        return FinalAnswer(answer=answer, aggregator=name, confidence=conf, votes=votes,
                           response=mine, note=note)
