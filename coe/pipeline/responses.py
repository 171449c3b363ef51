"""The expert generations of an evaluation, one cell per (question, expert), held as arrays.

Scoring needs little of a generation once its final answer is extracted: the answer, whether
it is right, its token counts and seconds, whether it failed (and why) or was cut off. That
is what ``ResponseTable`` keeps, in numpy arrays of questions x experts (about 35 bytes a
cell; answers as codes into the list of distinct answers), instead of an ``ExpertResponse``
per cell (about 800 bytes plus its text). The generation's text is kept only when something
will read it (``keep_text``: an llm aggregator, ``--record``, an answer served or written out,
which also keeps a generation's tool calls and logprobs); 100,000 questions x 8 experts of
recorded MMLU-Pro reasoning are 470 MB of text that voting never looks at.

The table is also a read-only mapping ``(question id, expert) -> ExpertResponse``, as the
job's dict of responses was: ``table[(qid, name)]`` builds the response again (with an empty
``text`` when texts are not kept), so code reading a few responses keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coe.core.types import ExpertResponse, Generation, Question
from coe.text.answers import answer_of, grade

NO_CATEGORY = "(none)"  # a question without a category, in per-category scores
FINISH_REASONS = ["stop", "length"]  # codes 0, 1; others are added as they come
TRUNCATIONS = ["max_tokens", "context"]


class Codes:
    """Distinct values and their codes (-1 for None), so arrays can hold strings."""

    def __init__(self, values: list[str] | None = None):
        self.values: list[str] = []
        self._code: dict[str, int] = {}
        for v in values or ():
            self.code(v)

    def code(self, value: str | None) -> int:
        if value is None:
            return -1
        c = self._code.get(value)
        if c is None:
            c = self._code[value] = len(self.values)
            self.values.append(value)
        return c

    def value(self, code: int) -> str | None:
        return None if code < 0 else self.values[code]


class ResponseTable(Mapping):
    """The generations of ``questions`` x ``names``; ``gold``: each question's normalised
    gold answer (None: not graded), which every answer is graded against as it arrives."""

    def __init__(self, questions: list[Question], names: list[str], gold: list[str | None],
                 keep_text: bool = False):
        n, e = len(questions), len(names)
        self.questions, self.names, self.gold = questions, names, gold
        self.has = np.zeros((n, e), bool)  # a generation is here
        self.answer = np.full((n, e), -1, np.int32)  # code in ``answers``; -1: no answer
        self.right = np.full((n, e), -1, np.int8)  # 1 right, 0 wrong, -1 not graded or failed
        self.prompt_tokens = np.zeros((n, e), np.int64)
        self.completion_tokens = np.zeros((n, e), np.int64)
        self.seconds = np.zeros((n, e))
        self.cached = np.zeros((n, e), bool)
        self.failed = np.zeros((n, e), bool)
        self.truncated = np.zeros((n, e), bool)
        self.finish_reason = np.full((n, e), -1, np.int8)
        self.truncated_by = np.full((n, e), -1, np.int8)
        self.errors: dict[tuple[int, int], str] = {}
        self.texts: dict[tuple[int, int], str] | None = {} if keep_text else None
        #: (tool_calls, logprobs) of the cells that have either, when texts are kept
        self.extras: dict[tuple[int, int], tuple] = {}
        self.answers = Codes()
        self.finish_reasons = Codes(FINISH_REASONS)
        self.truncations = Codes(TRUNCATIONS)
        self._rows: dict[str, int] | None = None
        self._categories: tuple[np.ndarray, list[str]] | None = None

    def fill(self, rows: list[int], cols: list[int], gens: list[Generation]) -> None:
        """Store generation ``gens[k]`` as cell (rows[k], cols[k]): its answer extracted and
        graded (as ``coe.text.answers.response_from`` and ``is_correct`` do), its text dropped
        unless texts are kept."""
        answers, right, errors = [], [], self.errors
        code, finish, trunc = self.answers.code, self.finish_reasons.code, self.truncations.code
        for i, j, g in zip(rows, cols, gens):
            q = self.questions[i]
            a = answer_of(g, q)
            answers.append(code(a))
            ok = None if g.error else grade(a, self.gold[i], q.answer_kind)
            right.append(-1 if ok is None else int(ok))
            if g.error is not None:
                errors[(i, j)] = g.error
            elif self.texts is not None:
                self.texts[(i, j)] = g.text
                if g.tool_calls or g.logprobs:
                    self.extras[(i, j)] = (g.tool_calls, g.logprobs)
        at = (np.asarray(rows, np.intp), np.asarray(cols, np.intp))
        self.has[at] = True
        self.answer[at] = answers
        self.right[at] = right
        self.prompt_tokens[at] = [g.prompt_tokens for g in gens]
        self.completion_tokens[at] = [g.completion_tokens for g in gens]
        self.seconds[at] = [round(g.seconds, 4) for g in gens]
        self.cached[at] = [g.cached for g in gens]
        self.failed[at] = [g.error is not None for g in gens]
        self.truncated[at] = [g.error is None and g.finish_reason == "length" for g in gens]
        self.finish_reason[at] = [finish(g.finish_reason) for g in gens]
        self.truncated_by[at] = [trunc(g.truncated_by) for g in gens]

    def response(self, i: int, j: int) -> ExpertResponse:
        """Cell (i, j) as the ``ExpertResponse`` ``response_from`` made of its generation
        (``text`` empty unless texts are kept)."""
        return self.responses([i], [j])[0]

    def responses(self, rows, cols) -> list[ExpertResponse]:
        """Cells (rows[k], cols[k]) as ``response`` makes them, read from the arrays at once."""
        at = (np.asarray(rows, np.intp), np.asarray(cols, np.intp))
        texts, errors, names = self.texts or {}, self.errors, self.names
        answer, finish, trunc = self.answers.value, self.finish_reasons.value, self.truncations.value
        extras = self.extras
        return [ExpertResponse(expert=names[j], text=texts.get((i, j), ""), answer=answer(a),
                               prompt_tokens=pt, completion_tokens=ct, seconds=sec, cached=c,
                               error=errors.get((i, j)), finish_reason=finish(fr), truncated=cut,
                               truncated_by=trunc(tb),
                               **({} if (i, j) not in extras else
                                  dict(zip(("tool_calls", "logprobs"), extras[(i, j)]))))
                for i, j, a, pt, ct, sec, c, fr, cut, tb in zip(
                    at[0].tolist(), at[1].tolist(), self.answer[at].tolist(),
                    self.prompt_tokens[at].tolist(), self.completion_tokens[at].tolist(),
                    self.seconds[at].tolist(), self.cached[at].tolist(),
                    self.finish_reason[at].tolist(), self.truncated[at].tolist(),
                    self.truncated_by[at].tolist())]

    def categories(self) -> tuple[np.ndarray, list[str]]:
        """Each question's category (``NO_CATEGORY`` for none) as a code into the list of
        distinct categories, for per-category scores."""
        if self._categories is None:
            codes = Codes()
            self._categories = (np.array([codes.code(q.category or NO_CATEGORY)
                                          for q in self.questions], np.intp), codes.values)
        return self._categories

    # -- the mapping (question id, expert) -> ExpertResponse ------------------------------------
    def _cell(self, key) -> tuple[int, int] | None:
        if self._rows is None:
            self._rows = {q.id: i for i, q in enumerate(self.questions)}
        try:
            qid, name = key
            i, j = self._rows[qid], self.names.index(name)
        except (KeyError, ValueError, TypeError):
            return None
        return (i, j) if self.has[i, j] else None

    def __getitem__(self, key) -> ExpertResponse:
        cell = self._cell(key)
        if cell is None:
            raise KeyError(key)
        return self.response(*cell)

    def __contains__(self, key) -> bool:
        return self._cell(key) is not None

    def __iter__(self):
        for i, j in zip(*np.nonzero(self.has)):  # question by question, experts in pool order
            yield self.questions[i].id, self.names[j]

    def __len__(self) -> int:
        return int(self.has.sum())
