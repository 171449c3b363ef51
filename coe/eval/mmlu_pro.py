"""Turn the recorded MMLU-Pro outputs of 8 real models into a replay pool.

``build_pool(DATA_DIR, OUT_DIR)`` reads ``model_outputs_<model>_5shots.zip`` (one JSON list of
12,032 records each) and writes:

- ``train.jsonl`` / ``test.jsonl``: the questions, split by ``question_id`` with the data
  README's seeded 50/50 split (ids sorted as integers, ``random.seed(0); random.shuffle``);
- ``replay/<model>.jsonl``: each model's recorded ``generated_text`` and extracted ``pred``
  (kept as the recorded answer, so scores match the published ones exactly);
- ``experts.yaml``: one ``replay`` expert per model, its ``strength`` its accuracy on the
  *training* half, and each category's experts ranked by training-half accuracy.

Nothing is copied into the repository; the output goes where the caller says.
"""

from __future__ import annotations

import ast
import json
import random
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import yaml

# The order the data README lists the models in.
MODELS = [
    "Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "mathstral-7B", "Meta-Llama-3-8B",
    "gemma-7b", "Mistral-7B-Instruct-v0.2", "Yi-6b-Chat", "Qwen1.5-7B-Chat",
]

# Parameters in billions (model cards), for average active parameters.
PARAMS = {
    "Meta-Llama-3_1-8B-Instruct": 8.0, "Phi-3-mini-4k-instruct": 3.8, "mathstral-7B": 7.2,
    "Meta-Llama-3-8B": 8.0, "gemma-7b": 8.5, "Mistral-7B-Instruct-v0.2": 7.2, "Yi-6b-Chat": 6.1,
    "Qwen1.5-7B-Chat": 7.7,
}


def _zip_for(data_dir: Path, model: str) -> Path:
    return data_dir / f"model_outputs_{model}_5shots.zip"


def read_records(path: Path) -> list[dict]:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".json"))
        return json.loads(z.read(name))


def _options(raw) -> list[str]:
    return raw if isinstance(raw, list) else ast.literal_eval(raw)


def expert_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", model)


def split_ids(ids: list[str], seed: int = 0) -> tuple[list[str], list[str]]:
    """The data README's split: sorted as integers, seeded shuffle, first half train."""
    order = sorted(ids, key=int)
    random.seed(seed)
    random.shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def build_pool(data_dir: str | Path, out_dir: str | Path, seed: int = 0,
               top_per_category: int = 3) -> dict:
    data_dir, out = Path(data_dir), Path(out_dir)
    (out / "replay").mkdir(parents=True, exist_ok=True)
    questions: dict[str, dict] = {}
    right: dict[str, dict[str, bool]] = {}
    for model in MODELS:
        recs = read_records(_zip_for(data_dir, model))
        name = expert_name(model)
        right[name] = {}
        with open(out / "replay" / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in recs:
                qid = str(r["question_id"])
                if qid not in questions:
                    questions[qid] = {"id": qid, "question": r["question"],
                                      "choices": _options(r["options"]), "answer": r["answer"],
                                      "category": r["category"], "meta": {"src": r.get("src")}}
                f.write(json.dumps({"id": qid, "text": r.get("generated_text") or "",
                                    "answer": r.get("pred")}) + "\n")
                right[name][qid] = r.get("pred") is not None and r.get("pred") == r["answer"]
    train, test = split_ids(list(questions), seed)
    for part, ids in (("train", train), ("test", test)):
        with open(out / f"{part}.jsonl", "w", encoding="utf-8") as f:
            for qid in ids:
                f.write(json.dumps(questions[qid]) + "\n")

    def acc(name: str, ids) -> float:
        ids = list(ids)
        return sum(right[name][i] for i in ids) / len(ids)

    names = [expert_name(m) for m in MODELS]
    strength = {n: round(acc(n, train), 4) for n in names}
    by_cat: dict[str, list[str]] = defaultdict(list)
    for qid in train:
        by_cat[questions[qid]["category"]].append(qid)
    categories = {}
    for cat in sorted(by_cat):
        ranked = sorted(names, key=lambda n: -acc(n, by_cat[cat]))
        categories[cat] = {"description": cat, "experts": ranked[:top_per_category]}
    categories["default"] = {"experts": sorted(names, key=lambda n: -strength[n])[:top_per_category]}
    pool = {
        "experts": [{"name": n, "backend": "replay", "model": f"replay/{n}.jsonl",
                     "prompt_format": "completion", "strength": strength[n],
                     "params": PARAMS.get(n)} for n in names],
        "categories": categories,
        "router": {"kind": "category"},
        "aggregator": {"kind": "vote"},
    }
    (out / "experts.yaml").write_text(yaml.safe_dump(pool, sort_keys=False), encoding="utf-8")
    return {"questions": len(questions), "train": len(train), "test": len(test),
            "strength": strength}


def ensure_pool(data_dir: str | Path, out_dir: str | Path) -> Path:
    """The pool folder, built from the recorded outputs first if it is not there yet."""
    out = Path(out_dir)
    if not (out / "experts.yaml").exists():
        build_pool(data_dir, out)
    return out
