"""A *pairwise-judged* pool (``coe pool`` on an AlpacaEval-style folder of open-ended answers).

The layout (detected by ``judgements/`` and ``reference.jsonl``; UTF-8 JSON Lines):

- ``questions.jsonl``: ``id, instruction, dataset?``;
- ``reference.jsonl``: ``id, output``: the answer every answer is judged against;
- ``outputs/<model>.jsonl``: ``id, output``: the model's recorded answer;
- ``judgements/<model>.jsonl``: ``id, preference, p_win, output_chars``: the judge's verdict
  of that answer against the reference (``p_win`` the probability it beats it, in [0, 1];
  ``output_chars`` must be ``len(output)``).

Every record is checked with pydantic (a bad one is a one-line error naming file:line), every
model must answer and be judged on exactly the questions of ``questions.jsonl``.

The pool has the layout of every pool: ``train.jsonl`` / ``test.jsonl`` (the questions as
``kind: free`` requests with the reference as their ``answer``, for a judge; the seeded
``split_ids`` split), ``replay/<expert>.jsonl`` (the
recorded text, and the judgement: ``p_win``, ``chars``, ``ref_chars``; the replay backend
ignores the extra fields) and ``experts.yaml``: each expert's ``strength`` its win rate on the
training half, the ``knn`` router over ``profiles.json`` (the training half's validation
record: question embeddings and each expert's *win*, ``p_win > 0.5``), and the vote
aggregator with the consensus ``threshold`` that scores best (LC win rate) on the training
half.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from coe.apps.eval.recorded import PoolSourceError, _unique_ids
from coe.core.config import load_config
from coe.io.output import check_output
from coe.learned.embeddings import shared_embedder, static_tag
from coe.learned.neighbours import ValidationRecord, text_hash
from coe.learned.profiles import ExpertProfile, Profiles

JUDGEMENTS, REFERENCE = "judgements", "reference.jsonl"
#: consensus thresholds tried on the training half
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
NEIGHBOURS = 100


class InstructionLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1)
    instruction: str = Field(min_length=1)
    dataset: str | None = None


class AnswerLine(BaseModel):
    """A line of ``reference.jsonl`` or ``outputs/<model>.jsonl``."""
    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1)
    output: str


class JudgementLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: StrictStr = Field(min_length=1)
    preference: float = Field(ge=1.0, le=2.0)
    p_win: float = Field(ge=0.0, le=1.0)
    output_chars: int = Field(ge=0)


def is_judged(source: str | Path) -> bool:
    src = Path(source)
    return (src / JUDGEMENTS).is_dir() and (src / REFERENCE).is_file()


def _read(path: Path, model: type[BaseModel], ids: list[str] | None) -> dict[str, tuple[int, BaseModel]]:
    rows = {qid: (lineno, item) for lineno, qid, item in _unique_ids(path, model)}
    if ids is not None and set(rows) != set(ids):
        missing = [i for i in ids if i not in rows]
        extra = [i for i in rows if i not in set(ids)]
        what = (f"{len(missing)} missing (e.g. {missing[0]!r})" if missing
                else f"{len(extra)} not in questions.jsonl (e.g. {extra[0]!r})")
        raise PoolSourceError(f"{path}: not the {len(ids):,} question ids of questions.jsonl: "
                              f"{what}")
    return rows


def read_judged(source: str | Path) -> dict:
    """The folder's instructions, reference lengths and each model's answers and judgements."""
    src = Path(source)
    qs = _read(src / "questions.jsonl", InstructionLine, None)
    if not qs:
        raise PoolSourceError(f"{src / 'questions.jsonl'}: no questions (empty file)")
    ids = list(qs)
    ref = _read(src / REFERENCE, AnswerLine, ids)
    models = sorted(p.stem for p in (src / JUDGEMENTS).glob("*.jsonl"))
    if not models:
        raise PoolSourceError(f"{src / JUDGEMENTS}: no <model>.jsonl judgements")
    answers: dict[str, dict[str, dict]] = {}
    for m in models:
        out_path = src / "outputs" / f"{m}.jsonl"
        if not out_path.is_file():
            raise PoolSourceError(f"{out_path}: missing (judgements/{m}.jsonl has no outputs)")
        outs = _read(out_path, AnswerLine, ids)
        judged = _read(src / JUDGEMENTS / f"{m}.jsonl", JudgementLine, ids)
        rows = {}
        for qid in ids:
            text = outs[qid][1].output
            lineno, j = judged[qid]
            if j.output_chars != len(text):
                raise PoolSourceError(f"{src / JUDGEMENTS / m}.jsonl:{lineno}: output_chars "
                                      f"{j.output_chars} but the output has {len(text)}")
            rows[qid] = {"id": qid, "text": text, "p_win": j.p_win, "chars": len(text),
                         "ref_chars": len(ref[qid][1].output)}
        answers[m] = rows
    # the reference is the question's answer: a free-text answer is never graded by
    # matching it, but a judge (coe eval --judge) compares answers with it
    questions = {qid: {"id": qid, "question": q.instruction,
                       **({"category": q.dataset} if q.dataset else {}), "kind": "free",
                       "answer": ref[qid][1].output}
                 for qid, (_, q) in qs.items()}
    return {"ids": ids, "questions": questions, "models": models, "answers": answers}


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_judged_pool(source: str | Path, out_dir: str | Path, seed: int = 0,
                      experts: list[str] | str | None = None, log=None) -> dict:
    """Write the judged pool of ``source`` to ``out_dir`` (see the module); returns a summary
    as ``build_pool``'s (``accuracy`` and ``strength``: train-half win rates, 0-1)."""
    from coe.apps.eval.judged_data import JudgedData
    from coe.apps.eval.pools import expert_name, select, split_ids
    from coe.apps.eval.recorded import Recording

    src, out = Path(source), Path(out_dir)
    data = read_judged(src)
    if experts is not None:
        recs = [Recording(m, src / JUDGEMENTS / f"{m}.jsonl", "generic") for m in data["models"]]
        data["models"] = [r.model for r in select(recs, experts)]
    names = [expert_name(m) for m in data["models"]]
    files = [out / "train.jsonl", out / "test.jsonl", out / "experts.yaml", out / "profiles.json",
             *(out / "replay" / f"{n}.jsonl" for n in names)]
    for f in files:
        check_output(f, [("recorded outputs", src)], what="pool file")
    (out / "replay").mkdir(parents=True, exist_ok=True)
    ids = data["ids"]
    for m, n in zip(data["models"], names):
        _write_jsonl(out / "replay" / f"{n}.jsonl", (data["answers"][m][i] for i in ids))
        if log:
            log(f"read {m}: {len(ids):,} judged answers")
    train, test = split_ids(ids, seed)
    for part, part_ids in (("train", train), ("test", test)):
        _write_jsonl(out / f"{part}.jsonl", (data["questions"][i] for i in part_ids))

    p = np.array([[data["answers"][m][i]["p_win"] for m in data["models"]] for i in train])
    strength = dict(zip(names, (round(float(x), 4) for x in p.mean(axis=0))))
    pool = {
        "experts": [{"name": n, "backend": "replay", "model": f"replay/{n}.jsonl",
                     "prompt_format": "completion", "strength": strength[n]} for n in names],
        "categories": {"default": {"experts": sorted(names, key=lambda n: -strength[n])[:3]}},
        "router": {"kind": "knn", "k": 3, "neighbours": NEIGHBOURS, "profiles": "profiles.json"},
        "aggregator": {"kind": "vote"},
    }
    # experts.yaml last (under a temporary name until then): a failed build is never a pool
    yml, partial = out / "experts.yaml", out / ".experts.yaml.partial"
    try:
        partial.write_text(yaml.safe_dump(pool, sort_keys=False), encoding="utf-8")
        config = load_config(partial)
        write_profiles(config, [data["questions"][i] for i in train],
                       (p > 0.5).astype(np.int8), out / "profiles.json")
        jd = JudgedData.load(config, [data["questions"][i] for i in train], [])
        threshold, scores = jd.choose_threshold(THRESHOLDS)
        pool["aggregator"]["threshold"] = threshold
        partial.write_text(yaml.safe_dump(pool, sort_keys=False), encoding="utf-8")
        partial.replace(yml)
    finally:
        partial.unlink(missing_ok=True)
    if log:
        log("consensus threshold on the training half (LC win rate): " + ", ".join(
            f"{t:g}: {s:.1f}" for t, s in scores.items()) + f" -> {threshold:g}")
    acc = {n: float(x) for n, x in zip(names, p.mean(axis=0))}
    return {"format": "judged", "questions": len(ids), "train": len(train), "test": len(test),
            "strength": strength, "accuracy": acc, "params": dict.fromkeys(names),
            "threshold": threshold}


def write_profiles(config, questions: list[dict], wins: np.ndarray, path: Path) -> None:
    """``profiles.json`` (+ ``.npz``) for the knn router: the training questions' embeddings
    and whether each expert won each (``wins``: questions x experts, 1 or 0)."""
    names = [e.name for e in config.experts]
    ref = config.embeddings.model
    vecs = shared_embedder(ref, config.embeddings.batch_size, str(config.base_dir)).encode(
        [q["question"] for q in questions])
    n = len(questions)
    record = ValidationRecord(
        ids=[q["id"] for q in questions], hashes=text_hash([q["question"] for q in questions]),
        embeddings=np.asarray(vecs, np.float16), experts=names,
        answers=np.full((n, len(names)), -1, np.int32), right=wins.astype(np.int8),
        gold=np.full(n, -2, np.int32), vocab=[], embedding_model=ref,
        embedding_tag=static_tag(ref, str(config.base_dir)))
    prof = Profiles(skill_source="judged: p_win > 0.5 on the training half",
                    experts={e: ExpertProfile(correct=int(wins[:, j].sum()), total=n)
                             for j, e in enumerate(names)},
                    questions=record.ids)
    prof.attach_record(record)
    prof.save(path)
