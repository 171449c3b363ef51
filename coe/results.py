"""What a run produces: one ``QuestionResult`` per question (one JSONL line in the output)."""

from __future__ import annotations

from pydantic import BaseModel, Field

from coe.routers.base import Route


class ExpertResponse(BaseModel):
    expert: str
    text: str = ""
    answer: str | None = None  # normalised final answer extracted from text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None


class FinalAnswer(BaseModel):
    answer: str | None
    aggregator: str
    confidence: float = 0.0
    votes: dict[str, int] = Field(default_factory=dict)
    response: ExpertResponse | None = None  # the llm aggregator's own generation
    note: str = ""


class QuestionResult(BaseModel):
    id: str
    question: str
    category: str | None = None
    gold: str | None = None
    route: Route
    responses: list[ExpertResponse]
    final_answer: str | None
    aggregator: str
    confidence: float
    votes: dict[str, int] = Field(default_factory=dict)
    aggregator_response: ExpertResponse | None = None
    correct: bool | None = None
    note: str = ""


def response_from(expert: str, gen, question) -> ExpertResponse:
    """An expert's generation with its final answer extracted."""
    from coe.answers import extract_answer, normalize

    if gen.error:
        answer = None
    elif gen.has_recorded_answer:
        answer = normalize(gen.recorded_answer, question.answer_kind,
                           len(question.choices or "ABCDEFGHIJKLMNOPQRSTUVWXYZ")) if gen.recorded_answer else None
    else:
        answer = extract_answer(gen.text, question)
    return ExpertResponse(expert=expert, text=gen.text, prompt_tokens=gen.prompt_tokens,
                          completion_tokens=gen.completion_tokens, seconds=round(gen.seconds, 4),
                          cached=gen.cached, error=gen.error, answer=answer)
