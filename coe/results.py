"""What a run produces: one ``QuestionResult`` per question (one JSONL line in the output).

The types live in ``coe.types`` and answer extraction in ``coe.answers``; this module keeps
their public names together for users of the Python API."""

from coe.answers import response_from
from coe.types import ExpertResponse, FinalAnswer, QuestionResult

__all__ = ["ExpertResponse", "FinalAnswer", "QuestionResult", "response_from"]
