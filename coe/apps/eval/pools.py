"""A replay pool from any folder of recorded outputs (``coe pool``).

``build_pool(SOURCE, OUT)`` reads the recorded outputs of a few models (``coe.apps.eval.recorded``:
MMLU-Pro files or the generic ``questions.jsonl`` + ``outputs/<model>.jsonl``) and writes:

- ``train.jsonl`` / ``test.jsonl``: the questions, split by id with the shared data README's
  seeded 50/50 split (ids sorted as integers when they all are, else as strings;
  ``random.seed(seed); random.shuffle``; first half train);
- ``replay/<expert>.jsonl``: each model's recorded texts and answers, in file order (a
  recorded answer is kept as the answer, so scores match the recorded ones exactly);
- ``experts.yaml``: one ``replay`` expert per model, its ``strength`` its accuracy on the
  *training* half, each category's experts ranked by training-half accuracy (ties: pool order)
  and the ``default`` category the strongest ones.

Answers are graded as ``coe eval`` grades them (``coe.text.answers``), so a strength is the
accuracy ``coe eval`` reports for that expert on the training half.

Every model must answer exactly the same question ids (those of the first model, or of the
generic ``questions.jsonl``): otherwise the build stops with a one-line error naming the model
and how many ids differ. Silently evaluating on the intersection would change the test set
(and every figure) without anyone deciding it; cutting the files is the user's call.

``experts`` picks a subset, in the order given, by names or shell patterns (``fnmatch``);
only the picked models' files are read. Replay files are written under temporary names and
put in place only once every model has been read and checked, and ``experts.yaml`` last: a
failed build leaves any earlier pool as it was, and ``ensure_pool`` never takes a half-built
one for a pool.
"""

from __future__ import annotations

import fnmatch
import json
import os
import random
import re
from pathlib import Path

import numpy as np
import yaml
from pydantic import ValidationError

from coe.apps.eval.judged_pool import build_judged_pool, is_judged
from coe.apps.eval.recorded import (
    GENERIC_QUESTIONS,
    KNOWN_MODELS,
    KNOWN_PARAMS,
    Format,
    PoolSourceError,
    Recording,
    find_recordings,
    read_generic_questions,
)
from coe.core.types import Generation, Question
from coe.core.wording import counted
from coe.io.output import check_output
from coe.text.answers import answer_of, gold_answer, gold_problem, grade

# The shared data's models and parameters, under the names callers used before ``coe pool``.
MODELS, PARAMS = KNOWN_MODELS, KNOWN_PARAMS

_INT = re.compile(r"-?\d+")


def expert_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", model)


def split_ids(ids: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """The data README's split: ids sorted as integers (as strings when any is not one), a
    seeded shuffle, the first half train."""
    order = sorted(ids, key=int) if all(_INT.fullmatch(i) for i in ids) else sorted(ids)
    random.Random(seed).shuffle(order)  # the same order as random.seed(seed); random.shuffle
    half = len(order) // 2
    return order[:half], order[half:]


def parse_params(specs: list[str] | None) -> dict[str, float]:
    """``["a=7", "b=1.5,c=3"]`` -> ``{"a": 7.0, "b": 1.5, "c": 3.0}`` (billions)."""
    out: dict[str, float] = {}
    for spec in specs or []:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, value = item.partition("=")
            try:
                b = float(value) if sep and name.strip() else None
            except ValueError:
                b = None
            if b is None or not b > 0 or b == float("inf"):
                raise PoolSourceError(f"--params {item!r}: expected NAME=BILLIONS, "
                                      f"e.g. my-model=7.2")
            out[name.strip()] = b
    return out


def select(recordings: list[Recording], experts: list[str] | str | None) -> list[Recording]:
    """The recordings named by ``experts`` (names or shell patterns, matched against the model
    or the expert name), in that order; all of them when None."""
    if experts is None:
        return recordings
    if isinstance(experts, str):
        experts = [e.strip() for e in experts.split(",")]
    picked: list[Recording] = []
    for pattern in filter(None, experts):
        hits = [r for r in recordings
                if fnmatch.fnmatchcase(r.model, pattern)
                or fnmatch.fnmatchcase(expert_name(r.model), pattern)]
        if not hits:
            have = ", ".join(r.model for r in recordings)
            raise PoolSourceError(f"--experts {pattern!r}: no recorded outputs of that model "
                                  f"(have: {have})")
        picked += [r for r in hits if r not in picked]
    if not picked:
        raise PoolSourceError("--experts names no model")
    return picked


def _question(rec: dict, where: str) -> Question:
    """The question as ``coe eval`` will read it, with a gradable gold answer."""
    try:
        q = Question.model_validate({k: v for k, v in rec.items() if k != "_line"})
    except ValidationError as e:
        first = e.errors()[0]
        fld = ".".join(str(p) for p in first["loc"]) or "record"
        raise PoolSourceError(f"{where}: field {fld!r}: {first['msg']}") from None
    why = gold_problem(q)
    if why or gold_answer(q) is None:
        raise PoolSourceError(f"{where}: {why or 'no gold answer'}")
    return q


def _check_ids(rec: Recording, ids: dict[str, int], reference: str) -> None:
    mine = {r["id"] for r in rec.replay}
    missing = [i for i in ids if i not in mine]
    extra = [r["id"] for r in rec.replay if r["id"] not in ids]
    if missing or extra:
        parts = ([f"{len(missing):,} missing (e.g. {missing[0]!r})"] if missing else []) + \
                ([f"{len(extra):,} not in it (e.g. {extra[0]!r})"] if extra else [])
        raise PoolSourceError(f"{rec.path}: model {rec.model!r} does not answer the same "
                              f"{len(ids):,} question ids as {reference}: {', '.join(parts)}")


def _grade(rec: Recording, questions: dict[str, dict], qs: list[Question], golds: list,
           ids: dict[str, int], where: str) -> tuple[np.ndarray, int, int]:
    """Whether each question (in ``ids`` order) was answered right, as ``coe eval`` grades it;
    with how many questions the model's own file states otherwise, and how many of them with
    another gold answer. A model is graded on the question as it was asked, which its file
    states: the published MMLU-Pro outputs of different models hold slightly different
    versions of a few questions (the shared data: up to 14 of 12,032, 3 with another answer)."""
    right = np.zeros(len(ids), dtype=bool)
    other = other_gold = 0
    for r in rec.replay:
        qid = r["id"]
        j = ids[qid]
        q, gold = qs[j], golds[j]
        own = rec.questions.get(qid)
        if own is not None and own != questions[qid]:
            q = _question(own, f"{where}: question {qid!r}")
            other += 1
            if gold_answer(q) != gold:
                gold, other_gold = gold_answer(q), other_gold + 1
        gen = Generation(text=r["text"], has_recorded_answer="answer" in r,
                         recorded_answer=r.get("answer"))
        right[j] = bool(grade(answer_of(gen, q), gold, q.answer_kind))
    return right, other, other_gold


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_pool(source: str | Path, out_dir: str | Path, seed: int = 0,
               top_per_category: int = 3, experts: list[str] | str | None = None,
               params: dict[str, float] | None = None, fmt: Format = "auto",
               log=None) -> dict:
    """Write the pool of ``source``'s recorded outputs to ``out_dir``; returns a summary:
    question counts, each expert's training-half ``strength`` and its ``params``."""
    src, out = Path(source), Path(out_dir)
    if fmt == "auto" and is_judged(src):  # answers judged against a reference (AlpacaEval)
        return build_judged_pool(src, out, seed=seed, experts=experts, log=log)
    kind, found = find_recordings(src, fmt)
    chosen = select(found, experts)
    names = [expert_name(r.model) for r in chosen]
    clash = {n for n in names if names.count(n) > 1}
    if clash:
        raise PoolSourceError(f"models {', '.join(r.model for r in chosen if expert_name(r.model) in clash)} "
                              f"would share the expert name {sorted(clash)[0]!r}")
    params = {**KNOWN_PARAMS, **(params or {})}
    unknown = [p for p in (params.keys() - KNOWN_PARAMS.keys())
               if p not in names and p not in {r.model for r in chosen}]
    if unknown:
        raise PoolSourceError(f"--params {sorted(unknown)[0]!r}: not a model of the pool "
                              f"(have: {', '.join(r.model for r in chosen)})")

    inputs = [("recorded outputs", r.path) for r in chosen]
    if kind == "generic":
        inputs.append(("question file", src / GENERIC_QUESTIONS))
    files = [out / "train.jsonl", out / "test.jsonl", out / "experts.yaml",
             *(out / "replay" / f"{n}.jsonl" for n in names)]
    for f in files:
        check_output(f, inputs, what="pool file")

    questions: dict[str, dict] = {}
    where: dict[str, str] = {}
    reference = ""
    if kind == "generic":
        qpath = src / GENERIC_QUESTIONS
        questions = read_generic_questions(qpath)
        where = {i: f"{qpath}:{q['_line']}" for i, q in questions.items()}
        reference = str(qpath)
    (out / "replay").mkdir(parents=True, exist_ok=True)
    tmp = {n: out / "replay" / f".{n}.jsonl.partial" for n in names}
    right: dict[str, np.ndarray] = {}
    try:
        ids: dict[str, int] = {}
        qs: list[Question] = []
        golds: list = []
        for rec, name in zip(chosen, names):
            rec.read()
            if not questions:  # MMLU-Pro: the first model's file states the questions
                questions = rec.questions
                where = {i: f"{rec.path}: question {i!r}" for i in questions}
                reference = rec.path.name
            if not ids:
                ids = {qid: j for j, qid in enumerate(questions)}
                qs = [_question(questions[i], where[i]) for i in ids]
                golds = [gold_answer(q) for q in qs]
            _check_ids(rec, ids, reference)
            right[name], other, other_gold = _grade(rec, questions, qs, golds, ids, str(rec.path))
            if other and log:
                log(f"note: {rec.path.name} states {counted(other, 'question')} otherwise than "
                    f"{reference} ({other_gold} with another gold answer): {rec.model} is "
                    f"graded on its own versions; train/test.jsonl keep the first file's")
            _write_jsonl(tmp[name], rec.replay)
            rec.forget()
            if log:
                log(f"read {rec.path.name}: {counted(len(ids), 'answer')} of {rec.model}")
        for name in names:
            os.replace(tmp[name], out / "replay" / f"{name}.jsonl")
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)

    train, test = split_ids(list(ids), seed)
    for part, part_ids in (("train", train), ("test", test)):
        _write_jsonl(out / f"{part}.jsonl",
                     ({k: v for k, v in questions[i].items() if k != "_line"} for i in part_ids))

    # One row per expert, one column per question: accuracy over any set of questions is a
    # column selection and a mean (counts are exact, so the division rounds as sum/len did).
    grid = np.stack([right[n] for n in names])
    tr = np.array([ids[i] for i in train], dtype=np.intp)

    def acc(cols: np.ndarray) -> list[float]:
        return (grid[:, cols].sum(axis=1) / len(cols)).tolist() if len(cols) else [0.0] * len(names)

    accuracy = dict(zip(names, acc(tr)))
    strength = {n: round(a, 4) for n, a in accuracy.items()}  # the yaml's, four places
    by_cat: dict[str, list[int]] = {}
    for i in train:
        cat = questions[i].get("category")
        if cat is not None:
            by_cat.setdefault(cat, []).append(ids[i])
    categories = {}
    for cat in sorted(by_cat):
        a = dict(zip(names, acc(np.array(by_cat[cat], dtype=np.intp))))
        ranked = sorted(names, key=lambda n: -a[n])  # stable: ties keep the pool order
        categories[cat] = {"description": cat, "experts": ranked[:top_per_category]}
    categories["default"] = {"experts": sorted(names, key=lambda n: -strength[n])[:top_per_category]}
    model_of = dict(zip(names, (r.model for r in chosen)))
    sizes = {n: params.get(model_of[n], params.get(n)) for n in names}
    pool = {
        "experts": [{"name": n, "backend": "replay", "model": f"replay/{n}.jsonl",
                     "prompt_format": "completion", "strength": strength[n],
                     **({"params": sizes[n]} if sizes[n] is not None else {})} for n in names],
        "categories": categories,
        "router": {"kind": "category"},
        "aggregator": {"kind": "vote"},
    }
    (out / "experts.yaml").write_text(yaml.safe_dump(pool, sort_keys=False), encoding="utf-8")
    return {"format": kind, "questions": len(ids), "train": len(train), "test": len(test),
            "strength": strength, "accuracy": accuracy, "params": sizes}


def ensure_pool(source: str | Path, out_dir: str | Path) -> Path:
    """The pool folder, built from the recorded outputs first if it is not there yet."""
    out = Path(out_dir)
    if not (out / "experts.yaml").exists():
        build_pool(source, out)
    return out
