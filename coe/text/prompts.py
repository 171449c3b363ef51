"""How a request becomes one expert's prompt: chat messages (the model's own chat template
renders them) or, for a completion-format model, text in the ``Question: ... Answer:`` template.

Three kinds of prompt:

- ``build_request``: a recruited expert answering a request inside a composition. The expert's
  persona and the request's system turns make the system message; earlier turns go as they
  are; the last user turn is the question, with its choices listed and the line the answer
  extraction reads asked for ("Finish with a line 'Answer: X'"), unless the request wants JSON
  (``response_format``) or may call tools, where that line would contradict it, or is open
  (a chat turn with nothing to grade) or free text (``answer_line``).
- ``proxy_request``: a pass-through (``model: <expert>`` in ``coe serve``): the caller's
  messages verbatim, the expert's own yaml ``system_prompt`` first if it has one, every
  generation option forwarded.
- a stage's own prompt (``messages=`` or ``prompt=``: the llm aggregator, the skill keywords):
  the expert's persona and format still apply.

A completion-format model cannot read tool turns or tool calls; such a conversation raises
``Unrenderable`` naming the expert, and the caller reports it as that expert's failure.
"""

from __future__ import annotations

from coe.core.request import LETTERS, Message, Request, Sampling
from coe.core.types import GenRequest

DEFAULT_SYSTEM = "You are a knowledgeable expert. Answer accurately and concisely."

_INSTRUCTION = {
    "mc": "Think briefly, then finish with a line 'Answer: X' where X is the letter of the correct option.",
    "number": "Think step by step, then finish with a line that starts with 'Answer:' followed by the final number only.",
    "text": "Finish with a line 'Answer: ...' giving the short final answer.",
}

# Completion (base-model) prompts end at the next question.
COMPLETION_STOP = ["\n\nQuestion:", "\nQuestion:"]


class Unrenderable(ValueError):
    """The conversation cannot be put in this expert's prompt format."""


def format_question(q: Request) -> str:
    """The last user turn, with the choices listed under it."""
    text = q.question.strip()
    if q.choices:
        opts = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
        text += f"\n\nOptions:\n{opts}"
    return text


def _system(q: Request, system_prompt: str | None) -> str | None:
    """The expert's persona, then the request's own system turns, if any."""
    parts = [p.strip() for p in (system_prompt, q.instructions) if p and p.strip()]
    return "\n\n".join(parts) or None


def answer_line(q: Request) -> str | None:
    """The instruction that asks for a final line the extraction reads; None when the request
    wants JSON or may call tools (the line would contradict what it asks), when its answer is
    free text (``kind: free``), and for an open request (``Request.open``: a chat turn with
    nothing to grade, sent as the user wrote it; a "write a poem" must not be told to end
    with a short answer)."""
    if (q.response_format is not None and q.response_format.wants_json) or q.tools:
        return None
    if q.answer_kind == "free" or q.open:
        return None
    return _INSTRUCTION[q.answer_kind]


def chat_messages(q: Request, system_prompt: str | None) -> tuple[Message, ...]:
    """A recruited expert's conversation (see the module doc)."""
    line = answer_line(q)
    user = format_question(q) + (f"\n\n{line}" if line else "")
    system = _system(q, system_prompt)
    if system_prompt is None or not system_prompt.strip():
        system = f"{DEFAULT_SYSTEM}\n\n{system}" if system else DEFAULT_SYSTEM
    earlier = [m for m in q.before_last_user if m.role not in ("system", "developer")]
    return (Message(role="system", content=system), *earlier, Message(role="user", content=user),
            *q.after_last_user)


def completion_prompt(q: Request, system_prompt: str | None) -> str:
    """The ``Question: ... Answer:`` template: earlier turns as earlier questions and answers."""
    system = _system(q, system_prompt)
    head = f"{system}\n\n" if system else ""
    turns = []
    for m in q.before_last_user:
        if m.role in ("system", "developer"):
            continue
        if not m.plain or m.role == "tool":
            raise Unrenderable("a completion-format model cannot read tool calls or results")
        turns.append(f"Question: {m.text.strip()}" if m.role == "user"
                     else f"Answer: {m.text.strip()}\n")
    if q.after_last_user:
        raise Unrenderable("a completion-format model cannot read tool calls or results")
    history = "\n".join(turns) + ("\n" if turns else "")
    return f"{head}{history}Question: {format_question(q)}\nAnswer:"


def _sampling(expert, q: Request, stage: str) -> Sampling:
    """The expert's sampling with the request's over it, for the answer and the aggregation;
    a stage's own generations (a router's) keep the expert's."""
    sampling = expert.sampling
    if q.sampling is not None and stage in ("expert", "aggregate"):
        sampling = q.sampling.apply(sampling)
    return sampling


def _sample(sampling: Sampling, sample: int) -> tuple[Sampling, int]:
    """The sampling and sample index of one of a request's ``n`` samples: a greedy sample is
    the same generation for every index (0: made once); a seeded one gets seed ``seed +
    sample``, so each sample is different and reproducible; an unseeded one is fresh anyway."""
    if sample == 0:
        return sampling, 0
    if sampling.temperature == 0.0:
        return sampling, 0
    if sampling.seed is not None:
        sampling = sampling.model_copy(update={"seed": sampling.seed + sample})
    return sampling, sample


def _extras(q: Request) -> dict:
    """What the request asks of every generation besides its prompt."""
    tools = tuple(q.tools) if q.tools else None
    return dict(tools=tools, tool_choice=q.tool_choice if tools else None,
                response_format=q.response_format,
                logprobs=q.sampling.wants_logprobs if q.sampling is not None else None)


def build_request(expert, q: Request, stage: str = "expert",
                  messages: tuple | None = None, prompt: str | None = None,
                  sample: int = 0) -> GenRequest:
    """The generation request of ``expert`` (its config) for request ``q``.

    Routers and aggregators that need a model pass their own ``messages`` (chat) or
    ``prompt`` (completion); the expert's prompt format and sampling still apply, and nothing
    of the request but its sampling (aggregation) goes with them."""
    sampling, sample = _sample(_sampling(expert, q, stage), sample)
    extras = _extras(q) if messages is None and prompt is None else {}
    if expert.prompt_format == "chat":
        if messages:
            msgs = tuple(m if isinstance(m, Message) else Message(role=m[0], content=m[1])
                         for m in messages)
            if expert.system_prompt:  # the persona stays; a task's own system follows
                if msgs[0].role == "system":
                    msgs = (Message(role="system", content=f"{expert.system_prompt}\n\n"
                                                           f"{msgs[0].text}"), *msgs[1:])
                else:
                    msgs = (Message(role="system", content=expert.system_prompt), *msgs)
        else:
            msgs = chat_messages(q, expert.system_prompt)
        return GenRequest(expert=expert.name, question_id=q.id, sampling=sampling,
                          messages=msgs, stage=stage, sample=sample, **extras)
    if prompt is not None:
        text = prompt
    elif messages:  # a chat-shaped request sent to a completion model
        text = "\n\n".join(m[1] if isinstance(m, tuple) else m.text for m in messages)
        if not text.rstrip().endswith(":"):  # the request brings its own cue ("Skills:")
            text += "\nAnswer:"
    else:
        text = completion_prompt(q, expert.system_prompt)
    stop = list(dict.fromkeys([*sampling.stop, *COMPLETION_STOP]))
    return GenRequest(expert=expert.name, question_id=q.id, stage=stage, prompt=text,
                      sampling=sampling.model_copy(update={"stop": stop}), sample=sample,
                      **extras)


def proxy_request(expert, q: Request, sample: int = 0) -> GenRequest:
    """A pass-through: the caller's conversation verbatim (the expert's own ``system_prompt``
    first, if the yaml gives one), every option of the request forwarded (``echo`` too). A
    completion-format expert gets the conversation in the ``Question: ... Answer:`` template."""
    sampling, sample = _sample(_sampling(expert, q, "expert"), sample)
    extras = _extras(q)
    echo = q.sampling is not None and q.sampling.echo
    if expert.prompt_format == "chat":
        msgs = tuple(q.messages)
        if expert.system_prompt and expert.system_prompt.strip():
            msgs = (Message(role="system", content=expert.system_prompt), *msgs)
        return GenRequest(expert=expert.name, question_id=q.id, sampling=sampling,
                          messages=msgs, sample=sample, echo=echo, **extras)
    if q.single_turn and not q.instructions and not expert.system_prompt:
        text = q.question  # a raw completion prompt, as the caller wrote it
    else:  # a conversation, in the template: it ends where the next question would start
        text = completion_prompt(q.model_copy(update={"choices": None}), expert.system_prompt)
        sampling = sampling.model_copy(update={
            "stop": list(dict.fromkeys([*sampling.stop, *COMPLETION_STOP]))})
    return GenRequest(expert=expert.name, question_id=q.id, sampling=sampling, prompt=text,
                      sample=sample, echo=echo, **extras)
