"""Tool calling for llama.cpp models, through the model's own chat template and a grammar (the
way llama-cpp-python's chat handlers do it: a named ``tool_choice`` becomes a grammar over that
tool's JSON schema; ``chatml-function-calling`` lets the model choose under "auto").

The tools are described in a system message, with the format a call takes (the
``<tool_call>`` tags of Hermes-style function calling, which SmolLM2 and Qwen were trained on):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and the generation is constrained by a grammar built from the tools' JSON schemas:

- ``tool_choice`` "auto" (the default): either such a call or text not starting with ``<``;
- "required": a call of any of the tools; a named function: a call of that one;
- "none": the tools are not offered, nothing is constrained.

A call comes back as the OpenAI ``tool_calls`` (``finish_reason`` "tool_calls"); the
conversation's own tool calls and results are written into it the same way (an assistant turn
with its calls in the tags, a tool result as a user turn in ``<tool_response>`` tags), so any
chat template renders them.
"""

from __future__ import annotations

import hashlib
import json
import re

from coe.core.types import FunctionCall, GenRequest, Message, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"\s*(\{.*\})\s*(?:" + re.escape(CLOSE) + r")?\s*$", re.S)


def wants_tools(r: GenRequest) -> bool:
    return bool(r.tools) and r.tool_choice != "none"


def offered(r: GenRequest) -> list:
    """The tools the model may call: the named one, or all of them."""
    choice = r.tool_choice
    if choice is not None and not isinstance(choice, str):
        return [t for t in r.tools if t.function.name == choice.function.name]
    return list(r.tools)


def system_text(r: GenRequest) -> str:
    lines = ["You may call functions to answer. The functions:"]
    for t in offered(r):
        f = t.function
        spec = {"name": f.name, "description": f.description or "",
                "parameters": f.parameters or {"type": "object"}}
        lines.append(json.dumps(spec, ensure_ascii=False))
    lines.append(f"To call a function, reply with only {OPEN}\n"
                 '{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
                 f"{CLOSE}")
    return "\n".join(lines)


def _turn(m: Message) -> dict:
    """A conversation turn as any chat template renders it (text only)."""
    if m.role == "tool":
        return {"role": "user",
                "content": f"<tool_response>\n{m.text}\n</tool_response>"}
    if m.role == "assistant" and m.tool_calls:
        calls = "\n".join(f'{OPEN}\n{{"name": {json.dumps(c.function.name)}, "arguments": '
                          f"{c.function.arguments}}}\n{CLOSE}" for c in m.tool_calls)
        return {"role": "assistant", "content": (m.text + "\n" if m.text else "") + calls}
    role = "system" if m.role == "developer" else m.role
    return {"role": role, "content": m.text}


def messages(r: GenRequest) -> list[dict]:
    """The conversation with the tools described in its system message."""
    turns = [_turn(m) for m in r.messages or ()]
    if wants_tools(r):
        tools = system_text(r)
        if turns and turns[0]["role"] == "system":
            turns[0] = {"role": "system", "content": f"{turns[0]['content']}\n\n{tools}"}
        else:
            turns.insert(0, {"role": "system", "content": tools})
    return turns


def grammar_text(r: GenRequest) -> str:
    """The GBNF of what the model may write (see the module doc)."""
    from llama_cpp import llama_grammar

    schema = {"anyOf": [{
        "type": "object", "required": ["name", "arguments"],
        "properties": {"name": {"const": t.function.name},
                       "arguments": t.function.parameters or {"type": "object"}}}
        for t in offered(r)]}
    gbnf = llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    gbnf = re.sub(r"^root ::=", "call ::=", gbnf, flags=re.M)
    call = f'"{OPEN}" "\\n"? call "\\n"? "{CLOSE}"'
    if r.tool_choice is None or r.tool_choice == "auto":
        return f"root ::= {call} | text\ntext ::= [^<] [^\\x00]*\n{gbnf}"
    return f"root ::= {call}\n{gbnf}"


def parse(text: str, question_id: str) -> list[ToolCall] | None:
    """The tool call a generation made (None: it answered in text)."""
    m = _CALL.match(text.strip())
    if m is None:
        return None
    try:
        call = json.loads(m.group(1))
    except ValueError:
        return None
    name, args = call.get("name"), call.get("arguments", {})
    if not isinstance(name, str):
        return None
    digest = hashlib.sha256(f"{question_id}:{text}".encode()).hexdigest()[:24]
    return [ToolCall(id=f"call_{digest}", function=FunctionCall(
        name=name, arguments=json.dumps(args, ensure_ascii=False)))]
