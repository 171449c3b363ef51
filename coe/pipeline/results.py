"""What a run produces: one ``QuestionResult`` per question (one JSONL line in the output).

The types live in ``coe.core.types`` and answer extraction in ``coe.text.answers``; this module keeps
their public names together for users of the Python API, with ``truncation_warning``: the one
line that says which answers were cut off (``ExpertResponse.truncated``) and still graded."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from coe.core.types import ExpertResponse, FinalAnswer, QuestionResult
from coe.text.answers import response_from

__all__ = ["ExpertResponse", "FinalAnswer", "QuestionResult", "response_from",
           "result_responses", "truncation_warning"]

_SHOWN = 5  # question ids listed per expert in the warning


def result_responses(results: Iterable[QuestionResult]) -> list[tuple[str, ExpertResponse]]:
    """(question id, response) of every generation behind the results: the experts' and the
    llm aggregator's."""
    out = []
    for r in results:
        out += [(r.id, resp) for resp in r.responses]
        if r.aggregator_response is not None:
            out.append((r.id, r.aggregator_response))
    return out


def truncation_warning(responses: Iterable[tuple[str, ExpertResponse]]) -> str | None:
    """One line naming the answers cut off before they ended (by expert: the question ids),
    how many by the context window and by max_tokens; None when none was."""
    cut = [(qid, r) for qid, r in responses if r.truncated]
    if not cut:
        return None
    why = Counter(r.truncated_by or "unknown" for _, r in cut)
    causes = ", ".join(f"{why[k]} by {label}" for k, label in
                       (("context", "the context window (n_ctx)"), ("max_tokens", "max_tokens"),
                        ("unknown", "an unknown limit")) if why[k])
    by_expert: dict[str, list[str]] = {}
    for qid, r in cut:
        by_expert.setdefault(r.expert, []).append(qid)
    where = "; ".join(f"{name} on {', '.join(ids[:_SHOWN])}"
                      + (f" (+{len(ids) - _SHOWN} more)" if len(ids) > _SHOWN else "")
                      for name, ids in by_expert.items())
    n = len(cut)
    return (f"warning: {n} answer{'s' if n != 1 else ''} cut off before the end "
            f"(finish_reason length: {causes}), graded as given: {where}")
