"""Recorded outputs: read a folder of LLM outputs recorded elsewhere, in one of two formats.

**MMLU-Pro** (the format of TIGER-AI-Lab/MMLU-Pro's ``eval_results/`` and of
``../shared/data/mmlu-pro-outputs``): one file per model, a ``.zip`` holding one JSON list or
a plain ``.json`` list, of records ``question_id, question, options, answer, category, src,
generated_text, pred`` (``options`` a list, or that list written as a Python literal; ``pred``
the letter extracted when it was recorded, may be null; other fields are ignored). The model
is named by the file: ``model_outputs_<model>_5shots`` -> ``<model>``, any other name -> its
stem.

**Generic**: ``questions.jsonl`` (``id, question, choices?, answer, category?``, plus an
optional ``meta`` object) and ``outputs/<model>.jsonl`` per model (``id, text, answer``; the
answer may be null, "no answer"; leave the key out to have coe extract it from the text, as it
does for a live model). An output line may also carry the replay file's optional fields
(``prompt_tokens, completion_tokens, seconds, finish_reason, truncated_by``).

Every record is checked with pydantic; a bad one is a one-line ``PoolSourceError`` naming the
file and its line (JSONL) or record number (a JSON list). A model whose file repeats a
question id is one too.

A ``Recording`` is one model's outputs as replay records (``coe.backends.replay``'s format),
in file order, and the questions its file states. Nothing is read before it is asked for, so
choosing a few experts of a large folder reads only their files.
"""

from __future__ import annotations

import ast
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from coe.core.errors import ConfigError

# The 8 models of ../shared/data/mmlu-pro-outputs, in the order its README lists them (a pool of
# them keeps this order, which decides vote ties), with their parameters in billions (model
# cards), for average active parameters. Other models come after them, by name, with no params
# unless ``--params`` gives them.
KNOWN_MODELS = [
    "Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "mathstral-7B", "Meta-Llama-3-8B",
    "gemma-7b", "Mistral-7B-Instruct-v0.2", "Yi-6b-Chat", "Qwen1.5-7B-Chat",
]
KNOWN_PARAMS = {
    "Meta-Llama-3_1-8B-Instruct": 8.0, "Phi-3-mini-4k-instruct": 3.8, "mathstral-7B": 7.2,
    "Meta-Llama-3-8B": 8.0, "gemma-7b": 8.5, "Mistral-7B-Instruct-v0.2": 7.2, "Yi-6b-Chat": 6.1,
    "Qwen1.5-7B-Chat": 7.7,
}

Format = Literal["auto", "mmlu-pro", "generic"]
GENERIC_QUESTIONS = "questions.jsonl"
GENERIC_OUTPUTS = "outputs"
_MMLU_PRO_NAME = re.compile(r"model_outputs_(.+)_\d+shots")


class PoolSourceError(ConfigError):
    """A folder of recorded outputs cannot make a pool (exit code 2, like a bad config)."""


def model_name(path: Path) -> str:
    """``model_outputs_<model>_5shots.zip`` -> ``<model>``; any other file -> its stem."""
    m = _MMLU_PRO_NAME.fullmatch(path.stem)
    return m.group(1) if m else path.stem


def _first_error(e: ValidationError, skip: int = 0) -> str:
    """``field 'x': message`` of a pydantic error (``skip`` leading loc parts: a list index)."""
    first = e.errors()[0]
    loc = first["loc"][skip:]
    # a union reports each member (``answer.str``...): name the field only
    fld = ".".join(str(p) for p in loc if p not in ("str", "int", "float", "list[str]", "is-instance[str]"))
    msg = "missing" if first["type"] == "missing" else first["msg"]
    return f"field {fld or 'record'!r}: {msg}"


# --- MMLU-Pro ------------------------------------------------------------------------------

class MmluProRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    question_id: StrictInt | StrictStr
    question: str
    options: list[str] | str
    answer: str
    category: str | None = None
    src: str | None = None
    generated_text: str | None = None
    pred: str | None = None


_MMLU_PRO_LIST = TypeAdapter(list[MmluProRecord])


def _read_json_list(path: Path) -> bytes:
    if path.suffix.lower() != ".zip":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as z:
            inside = [n for n in z.namelist() if n.lower().endswith(".json")]
            if len(inside) != 1:
                raise PoolSourceError(f"{path}: expected one .json file inside, found "
                                      f"{len(inside)}")
            return z.read(inside[0])
    except zipfile.BadZipFile as e:
        raise PoolSourceError(f"{path}: not a zip file ({e})") from None


def _options(raw: list[str] | str, where: str) -> list[str]:
    if isinstance(raw, list):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise PoolSourceError(f"{where}: field 'options': not a list of strings")
    return value


def _read_mmlu_pro(path: Path) -> tuple[dict[str, dict], list[dict]]:
    data = _read_json_list(path)
    try:
        recs = _MMLU_PRO_LIST.validate_json(data)
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"].startswith("json") or not first["loc"]:
            raise PoolSourceError(f"{path}: not a JSON list of MMLU-Pro records "
                                  f"({first['msg']})") from None
        raise PoolSourceError(f"{path}: record {int(first['loc'][0]) + 1}: "
                              f"{_first_error(e, skip=1)}") from None
    questions: dict[str, dict] = {}
    replay: list[dict] = []
    for i, r in enumerate(recs, 1):
        qid = str(r.question_id)
        if qid in questions:
            raise PoolSourceError(f"{path}: record {i}: question id {qid!r} repeated")
        q = {"id": qid, "question": r.question,
             "choices": _options(r.options, f"{path}: record {i}"), "answer": r.answer}
        if r.category is not None:
            q["category"] = r.category
        q["meta"] = {"src": r.src}
        questions[qid] = q
        replay.append({"id": qid, "text": r.generated_text or "", "answer": r.pred})
    return questions, replay


# --- generic -------------------------------------------------------------------------------

class QuestionLine(BaseModel):
    """One line of a generic ``questions.jsonl``."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt
    question: str = Field(min_length=1)
    choices: list[str] | None = None
    answer: StrictStr | StrictInt | float
    category: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict)


class OutputLine(BaseModel):
    """One line of a generic ``outputs/<model>.jsonl``: a replay record."""

    model_config = ConfigDict(extra="forbid")

    id: StrictStr | StrictInt
    text: str | None
    answer: StrictStr | StrictInt | float | None = None
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0)
    finish_reason: str | None = None
    truncated_by: Literal["max_tokens", "context"] | None = None


def _jsonl(path: Path, model: type[BaseModel]):
    """(line number, validated record) of every non-blank line."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise PoolSourceError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, model.model_validate_json(line)
                except ValidationError as e:
                    if e.errors()[0]["type"].startswith("json"):
                        raise PoolSourceError(f"{path}:{lineno}: invalid JSON") from None
                    raise PoolSourceError(f"{path}:{lineno}: {_first_error(e)}") from None
        except UnicodeDecodeError as e:
            raise PoolSourceError(f"{path}: not valid UTF-8 ({e.reason})") from None


def _unique_ids(path: Path, model: type[BaseModel]) -> Iterator[tuple[int, str, BaseModel]]:
    """``_jsonl``'s lines with their ``id`` as a string; an id seen on an earlier line is one
    line naming both."""
    first: dict[str, int] = {}
    for lineno, item in _jsonl(path, model):
        qid = str(item.id)
        if qid in first:
            raise PoolSourceError(f"{path}:{lineno}: question id {qid!r} repeated "
                                  f"(first on line {first[qid]})")
        first[qid] = lineno
        yield lineno, qid, item


def read_generic_questions(path: Path) -> dict[str, dict]:
    """The questions of a generic ``questions.jsonl``, as written to train/test, by id; each
    with the line it came from under ``"_line"``."""
    questions: dict[str, dict] = {}
    for lineno, qid, q in _unique_ids(path, QuestionLine):
        rec = {"id": qid, "question": q.question}
        if q.choices is not None:
            rec["choices"] = q.choices
        rec["answer"] = str(q.answer)
        if q.category is not None:
            rec["category"] = q.category
        if q.meta:
            rec["meta"] = q.meta
        rec["_line"] = lineno
        questions[qid] = rec
    if not questions:
        raise PoolSourceError(f"{path}: no questions (empty file)")
    return questions


def _read_generic_outputs(path: Path) -> list[dict]:
    replay: list[dict] = []
    for _, qid, r in _unique_ids(path, OutputLine):
        rec = {"id": qid, "text": r.text or ""}
        for k, v in r.model_dump(exclude_unset=True).items():
            if k not in rec:
                rec[k] = str(v) if k == "answer" and v is not None else v
        replay.append(rec)
    return replay


# --- a folder ------------------------------------------------------------------------------

@dataclass
class Recording:
    """One model's recorded outputs (read on ``read``)."""

    model: str
    path: Path
    kind: Literal["mmlu-pro", "generic"]
    questions: dict[str, dict] = field(default_factory=dict)  # MMLU-Pro: stated by the file
    replay: list[dict] = field(default_factory=list)  # replay records, in file order

    def read(self) -> Recording:
        if self.kind == "mmlu-pro":
            self.questions, self.replay = _read_mmlu_pro(self.path)
        else:
            self.replay = _read_generic_outputs(self.path)
        if not self.replay:
            raise PoolSourceError(f"{self.path}: no recorded outputs (empty file)")
        return self

    def forget(self) -> None:
        self.questions, self.replay = {}, []


def detect_format(source: Path) -> Literal["mmlu-pro", "generic"]:
    """``generic`` when the folder holds ``questions.jsonl``, else ``mmlu-pro``."""
    return "generic" if (source / GENERIC_QUESTIONS).is_file() else "mmlu-pro"


def find_recordings(source: str | Path, fmt: Format = "auto"
                    ) -> tuple[Literal["mmlu-pro", "generic"], list[Recording]]:
    """The format of ``source`` and its models' recordings (nothing read yet): the known
    models first in their order, then the others by name."""
    src = Path(source)
    if not src.is_dir():
        raise PoolSourceError(f"{src}: not a folder of recorded outputs"
                              + ("" if src.exists() else " (not found)"))
    kind = detect_format(src) if fmt == "auto" else fmt
    if kind == "generic":
        if not (src / GENERIC_QUESTIONS).is_file():
            raise PoolSourceError(f"{src}: no {GENERIC_QUESTIONS} (the generic format is "
                                  f"{GENERIC_QUESTIONS} + {GENERIC_OUTPUTS}/<model>.jsonl)")
        files = sorted((src / GENERIC_OUTPUTS).glob("*.jsonl"))
        expected = f"{GENERIC_OUTPUTS}/<model>.jsonl files"
    else:
        files = sorted(p for p in src.iterdir()
                       if p.suffix.lower() in (".zip", ".json") and p.is_file())
        expected = (f"MMLU-Pro .zip or .json files, or {GENERIC_QUESTIONS} + "
                    f"{GENERIC_OUTPUTS}/<model>.jsonl")
    found: dict[str, Recording] = {}
    for p in files:
        name = model_name(p)
        if name in found:
            raise PoolSourceError(f"{src}: model {name!r} recorded twice "
                                  f"({found[name].path.name} and {p.name})")
        found[name] = Recording(name, p, kind)
    if not found:
        raise PoolSourceError(f"{src}: no recorded outputs (expected {expected})")
    known = [m for m in KNOWN_MODELS if m in found]
    others = sorted(m for m in found if m not in KNOWN_MODELS)
    return kind, [found[m] for m in known + others]
