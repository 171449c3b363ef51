"""A pairwise judge: one expert compares an answer with the reference answer, in both orders.

Strategies that write new text (the llm aggregator's ``fuse``, a live run) have no recorded
judgement, so ``coe eval --judge <expert>`` asks an expert of the pool. For each answer it is
shown the instruction and two responses, the reference and the answer, once in each order
(LLM judges prefer a position; asking both ways and averaging cancels it), and names the
better one or a tie. The answer's ``p_win`` is the mean over the orders it gave a verdict in:
1 for a win, 0.5 for a tie, 0 for a loss. An order whose reply names neither is not counted;
an answer with no verdict in either order has no ``p_win`` (and is reported as such).

How far to trust it is measured, not assumed (``trust``): the judge is run on answers whose
judgement is recorded (GPT-4 Turbo's, in a judged pool) and its verdicts are compared with
them: how often it names the same winner, the rank correlation of its ``p_win`` with the
recorded one, and how often its two orders agree with each other. A judge near chance on those
is a coin, and ``Trust.sentence`` says so in plain words.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np
from scipy import stats

from coe.core.types import Generation, GenRequest, Question
from coe.text.prompts import build_request

SYSTEM = ("You are a fair judge of responses to instructions. You compare two responses to the "
          "same instruction and decide which one is more helpful, accurate and complete. A "
          "longer response is not better for being longer.")
_VERDICT = re.compile(r"\b(A|B)\b|\b([Tt][Ii][Ee])\b")  # capital A/B: "a" is an article
_ALONE = re.compile(r"\s*\(?([ab])\)?\.?\s*")  # a reply of one small letter
MAX_CHARS = 3000  # of each response shown: a small judge's context is short
#: a judge that names the recorded winner this often is worth using (and no less)
TRUSTED_AGREEMENT = 0.7


def prompt(instruction: str, first: str, second: str) -> str:
    def cut(t: str) -> str:
        t = t.strip()
        return t[:MAX_CHARS] + " ..." if len(t) > MAX_CHARS else t

    return (f"Instruction:\n{instruction.strip()}\n\nResponse A:\n{cut(first)}\n\n"
            f"Response B:\n{cut(second)}\n\nWhich response is better? Reply with exactly one "
            "of: A, B, tie.")


def verdict(text: str) -> str | None:
    """"A", "B" or "tie" (the first one the reply names), or None."""
    alone = _ALONE.fullmatch(text or "")
    if alone:
        return alone.group(1).upper()
    m = _VERDICT.search(text or "")
    if m is None:
        return None
    return m.group(1).upper() if m.group(1) else "tie"


@dataclass(frozen=True)
class Item:
    """One answer to judge: its question id, the instruction, the reference, the answer."""

    id: str
    instruction: str
    reference: str
    answer: str


@dataclass(frozen=True)
class Judged:
    id: str
    p_win: float | None  # the answer's, against the reference
    verdicts: tuple[str | None, str | None]  # reference first, then answer first
    consistent: bool  # both orders gave the same winner (or both a tie)


def requests(judge, items: list[Item], max_tokens: int = 8) -> list[GenRequest]:
    """Two greedy generations per item (``judge``: the judge expert's config): reference as
    A, then the answer as A."""
    out = []
    for it in items:
        q = Question(id=it.id, question=it.instruction, kind="free")
        for first, second in ((it.reference, it.answer), (it.answer, it.reference)):
            r = build_request(judge, q, stage="judge",
                              messages=(("system", SYSTEM),
                                        ("user", prompt(it.instruction, first, second))))
            sampling = r.sampling.model_copy(update={"temperature": 0.0,
                                                     "max_tokens": max_tokens})
            out.append(dataclasses.replace(r, sampling=sampling))
    return out


def run(executor, judge, items: list[Item]) -> list[Judged]:
    """Judge ``items`` with expert ``judge`` (its config) through ``executor`` (its cache
    too: a judgement asked again is read back)."""
    return judged(items, executor.run(requests(judge, items)).generations)


_SCORE = {("ref_first", "B"): 1.0, ("ref_first", "A"): 0.0,
          ("answer_first", "A"): 1.0, ("answer_first", "B"): 0.0}


def judged(items: list[Item], gens: list[Generation]) -> list[Judged]:
    """The judgements of ``items`` from the generations of ``requests(items)``."""
    if len(gens) != 2 * len(items):
        raise ValueError("a judge gives two generations per item (both orders)")
    out = []
    for k, it in enumerate(items):
        v = tuple(None if g.error else verdict(g.text) for g in gens[2 * k: 2 * k + 2])
        scores = [0.5 if x == "tie" else _SCORE[(order, x)]
                  for order, x in zip(("ref_first", "answer_first"), v) if x is not None]
        out.append(Judged(it.id, float(np.mean(scores)) if scores else None, v,
                          consistent=None not in v and len(set(scores)) == 1))
    return out


@dataclass(frozen=True)
class Trust:
    n: int  # answers judged with a recorded judgement
    decided: int  # of them, those the local judge decided (p_win not 0.5, not missing)
    agreement: float | None  # share of the decided where it names the recorded winner
    agreement_ci: tuple[float, float] | None
    spearman: float | None  # rank correlation of its p_win with the recorded p_win
    consistent: float  # share whose two orders agree

    @property
    def sentence(self) -> str:
        if not self.decided or self.agreement is None:
            return (f"the judge decided none of {self.n} answers with a recorded judgement: "
                    "its verdicts cannot be used")
        lo, hi = self.agreement_ci
        figures = (f"it names the recorded judge's winner on {100 * self.agreement:.0f}% of the "
                   f"{self.decided} answers it decided (95% CI {100 * lo:.0f}-{100 * hi:.0f}%; "
                   f"chance is 50%), its two orders agree on {100 * self.consistent:.0f}%, "
                   f"Spearman {self.spearman:+.2f} with the recorded p_win")
        if lo > TRUSTED_AGREEMENT - 0.1 and self.agreement >= TRUSTED_AGREEMENT:
            return f"usable with care: {figures}"
        if lo > 0.5:
            return (f"weak: {figures}; better than chance, not good enough to rank strategies "
                    "a few points apart")
        return (f"do not trust it: {figures}; no better than chance, so a win rate it gives "
                "says nothing about the answers")


def trust(local: list[Judged], recorded: dict[str, float]) -> Trust:
    """How well ``local`` judgements agree with ``recorded`` p_win (id -> p_win)."""
    from coe.apps.eval.scoring import wilson_interval

    pairs = [(j, recorded[j.id]) for j in local if j.id in recorded]
    decided = [(j.p_win, r) for j, r in pairs if j.p_win is not None and j.p_win != 0.5
               and r != 0.5]
    agree = sum((p > 0.5) == (r > 0.5) for p, r in decided)
    scored = [(j.p_win, r) for j, r in pairs if j.p_win is not None]
    rho = None
    if len(scored) > 2 and len({p for p, _ in scored}) > 1:
        rho = float(stats.spearmanr([p for p, _ in scored], [r for _, r in scored])[0])
    return Trust(n=len(pairs), decided=len(decided),
                 agreement=agree / len(decided) if decided else None,
                 agreement_ci=wilson_interval(agree, len(decided)) if decided else None,
                 spearman=rho if rho is not None else 0.0,
                 consistent=float(np.mean([j.consistent for j, _ in pairs])) if pairs else 0.0)
