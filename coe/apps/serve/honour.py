"""What a composition can honour of a request, decided before anything is generated: a request
is answered as asked, or refused with a 400 naming the field (``Refused``), never answered
while ignoring part of it.

- A pass-through (``model: <expert>``) forwards everything to its expert: whatever the expert's
  backend does not declare it can do (``Capabilities``: tools, a JSON response format,
  logprobs, echo; a tool turn to a completion-format model) is refused before the request is
  queued (``check_pass_through``).
- A composition (``coe``, ``coe/<router>+<aggregator>``):

  - ``logprobs`` / ``top_logprobs`` and ``echo`` are refused (``check_composition``): its answer
    is chosen among several experts' texts, or written by an aggregator from them, so no one
    model's token probabilities describe it;
  - a JSON ``response_format`` (json_object, json_schema) is asked of every recruit whose
    backend honours it (the others are not asked, and say why in ``coe.failed``); refused when
    no recruit of the request's route can (``settle``);
  - ``tools``: the request is delegated to one recruit, the strongest whose backend honours
    tools (the highest route weight, then the yaml's ``strength``), as a pass-through; its
    route's reason says so; refused when no recruit can (``settle``).
"""

from __future__ import annotations

from typing import Callable

from coe.backends import Capabilities
from coe.core.config import PoolConfig
from coe.core.types import Question, Recruit, Route
from coe.pipeline.generate import checked

#: what ``Capabilities.lacks`` says -> the request field it comes from
PARAMS = {"tools": "tools", "logprobs": "logprobs", "echo": "echo", "messages": "messages",
          "chat messages": "messages"}


class Refused(Exception):
    """The request asks what its composition cannot honour: 400 naming ``param``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


def _param(lack: str) -> str:
    return "response_format" if lack.startswith("response_format") else PARAMS.get(lack, lack)


def check_pass_through(q: Question, expert: str, config: PoolConfig,
                       caps: Callable[[str], Capabilities]) -> None:
    """Raise ``Refused`` if expert ``expert`` cannot honour all of ``q``."""
    _, lack, why = checked("proxy", q, config.expert(expert), caps(expert))
    if lack is not None:
        raise Refused(_param(lack), why)


def check_composition(q: Question, name: str) -> None:
    """Raise ``Refused`` for what no composition of several experts can honour."""
    s = q.sampling
    if s is not None and s.wants_logprobs is not None:
        raise Refused("logprobs", f"model {name!r} answers with a vote or an aggregator over "
                      "several experts' texts: it has no token log-probabilities; ask one "
                      "expert by name (model: <expert>)")
    if s is not None and s.echo:
        raise Refused("echo", f"model {name!r} does not give the prompt back (echo); ask one "
                      "expert by name (model: <expert>)")


def _wants_json(q: Question) -> bool:
    return q.response_format is not None and q.response_format.wants_json


def settle(q: Question, route: Route, config: PoolConfig,
           caps: Callable[[str], Capabilities]) -> Route | None:
    """For a composition's request: None to answer it along ``route`` as it is, or the route
    of the one expert it is delegated to (tools). Raises ``Refused`` when no recruit can
    honour what it asks."""
    names = route.names
    if q.tools:
        able = [r for r in route.experts if checked("proxy", q, config.expert(r.name),
                                                    caps(r.name))[1] is None]
        if not able:
            raise Refused("tools", f"no expert of this request's route ({', '.join(names)}) "
                          "can honour tools; ask a tool-capable expert by name")
        strength = {e.name: e.strength for e in config.experts if e.strength is not None}
        pick = max(able, key=lambda r: (r.weight, strength.get(r.name, float("-inf"))))
        return route.model_copy(update={
            "experts": [Recruit(name=pick.name, weight=pick.weight)],
            "reason": (f"{route.reason}; " if route.reason else "") +
                      f"tools: delegated to {pick.name}, the strongest tool-capable recruit "
                      f"of {', '.join(names)}"})
    if _wants_json(q):
        if not any(checked("compose", q, config.expert(n), caps(n))[1] is None for n in names):
            raise Refused("response_format", f"no expert of this request's route "
                          f"({', '.join(names)}) can honour response_format "
                          f"{q.response_format.type}")
    return None
