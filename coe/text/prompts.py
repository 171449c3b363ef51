"""How a question becomes a prompt for one expert (chat messages or completion text)."""

from __future__ import annotations

from coe.core.types import LETTERS, GenRequest, Question

DEFAULT_SYSTEM = "You are a knowledgeable expert. Answer accurately and concisely."

_INSTRUCTION = {
    "mc": "Think briefly, then finish with a line 'Answer: X' where X is the letter of the correct option.",
    "number": "Think step by step, then finish with a line that starts with 'Answer:' followed by the final number only.",
    "text": "Finish with a line 'Answer: ...' giving the short final answer.",
}

# Completion (base-model) prompts end at the next question.
COMPLETION_STOP = ["\n\nQuestion:", "\nQuestion:"]


def format_question(q: Question) -> str:
    text = q.question.strip()
    if q.choices:
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
        text += f"\n\nOptions:\n{opts}"
    return text


def _system(q: Question, system_prompt: str | None) -> str | None:
    """The expert's persona, then the question's own instructions (a request's system
    message), if any."""
    parts = [p.strip() for p in (system_prompt, q.instructions) if p and p.strip()]
    return "\n\n".join(parts) or None


def chat_messages(q: Question, system_prompt: str | None) -> tuple[tuple[str, str], ...]:
    user = f"{format_question(q)}\n\n{_INSTRUCTION[q.answer_kind]}"
    system = _system(q, system_prompt)
    if system_prompt is None or not system_prompt.strip():
        system = f"{DEFAULT_SYSTEM}\n\n{system}" if system else DEFAULT_SYSTEM
    return (("system", system), ("user", user))


def completion_prompt(q: Question, system_prompt: str | None) -> str:
    system = _system(q, system_prompt)
    head = f"{system}\n\n" if system else ""
    return f"{head}Question: {format_question(q)}\nAnswer:"


def build_request(expert, q: Question, stage: str = "expert",
                  messages: tuple[tuple[str, str], ...] | None = None,
                  prompt: str | None = None) -> GenRequest:
    """The generation request of ``expert`` (its config) for question ``q``.

    Routers and aggregators that need a model pass their own ``messages`` (chat) or
    ``prompt`` (completion); the expert's prompt format and sampling still apply. The
    question's own sampling (a served request's) overrides the expert's for the answer and
    the aggregation, never for a router's own generations."""
    sampling = expert.sampling
    if q.sampling is not None and stage in ("expert", "aggregate"):
        sampling = q.sampling.apply(sampling)
    if expert.prompt_format == "chat":
        msgs = messages or chat_messages(q, expert.system_prompt)
        if messages and expert.system_prompt:  # the persona stays; a task's own system follows
            if messages[0][0] == "system":
                msgs = (("system", f"{expert.system_prompt}\n\n{messages[0][1]}"), *messages[1:])
            else:
                msgs = (("system", expert.system_prompt), *messages)
        return GenRequest(expert=expert.name, question_id=q.id, sampling=sampling,
                          messages=msgs, stage=stage)
    text = prompt if prompt is not None else completion_prompt(q, expert.system_prompt)
    if messages and prompt is None:  # a chat-shaped request sent to a completion model
        text = "\n\n".join(c for _, c in messages)
        if not text.rstrip().endswith(":"):  # the request brings its own cue ("Skills:")
            text += "\nAnswer:"
    stop = list(dict.fromkeys([*sampling.stop, *COMPLETION_STOP]))
    return GenRequest(expert=expert.name, question_id=q.id, stage=stage, prompt=text,
                      sampling=sampling.model_copy(update={"stop": stop}))
