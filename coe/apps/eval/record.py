"""``coe eval --record DIR``: write every expert generation the job used as replay files.

``DIR/replay/<expert>.jsonl`` holds one ``{"id", "text", "answer", "prompt_tokens",
"completion_tokens", "seconds"}`` record per question (plus ``finish_reason`` and
``truncated_by`` when known, so an answer cut off replays as cut off) (``answer`` is the normalised answer
extracted at the time, so a replay re-scores exactly), and ``DIR/experts.yaml`` is the same
pool with every expert turned into a ``replay`` expert (names, categories, params, prices and
strengths kept). ``coe eval QUESTIONS -c DIR/experts.yaml`` then re-runs the evaluation with no
model. Aggregator-LLM generations are not recorded: a replay expert answers per question id,
so it cannot also stand for an aggregation prompt.

The files are written record by record. The texts they hold are the one thing an evaluation
otherwise drops once each answer is extracted: with ``--record`` the job keeps them
(``EvalOptions.keep_texts``) until they are written, so recording costs the texts' memory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import yaml

from coe.core.config import ExpertConfig, PoolConfig
from coe.core.types import ExpertResponse, Question

_KEEP = set(ExpertConfig.model_fields) - {"backend", "model"}


def _record(q: Question, r: ExpertResponse) -> dict:
    rec = {"id": q.id, "text": r.text, "answer": r.answer, "prompt_tokens": r.prompt_tokens,
           "completion_tokens": r.completion_tokens, "seconds": r.seconds}
    if r.finish_reason is not None:
        rec["finish_reason"] = r.finish_reason
    if r.truncated_by is not None:
        rec["truncated_by"] = r.truncated_by
    return rec


def write_replay(out_dir: str | Path, config: PoolConfig,
                 sets: list[tuple[list[Question], Mapping[tuple[str, str], ExpertResponse]]]
                 ) -> dict:
    """Write the replay pool; ``sets`` are (questions, responses by (question id, expert)).
    A question id already written for an expert (from an earlier set) is not written again.
    Each file is written record by record, as the responses are read."""
    out = Path(out_dir)
    (out / "replay").mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}
    conflicts = 0
    for e in config.experts:
        count, skipped = _write_records(out / "replay" / f"{e.name}.jsonl", e.name, sets)
        conflicts += skipped
        if count:
            written[e.name] = count
    (out / "experts.yaml").write_text(
        yaml.safe_dump(replay_pool(config, set(written)), sort_keys=False, allow_unicode=True),
        encoding="utf-8")
    return {"dir": str(out), "records": written, "duplicate_ids_skipped": conflicts}


def _write_records(path: Path, expert: str, sets) -> tuple[int, int]:
    """Write one expert's JSONL records (the file only if there is one); return how many,
    and how many repeated question ids were skipped."""
    seen: set[str] = set()
    count, conflicts, f = 0, 0, None
    try:
        for questions, responses in sets:
            for q in questions:
                r = responses.get((q.id, expert))
                if r is None or r.error is not None:
                    continue
                if q.id in seen:
                    conflicts += 1
                    continue
                seen.add(q.id)
                if f is None:
                    f = open(path, "w", encoding="utf-8")
                f.write(json.dumps(_record(q, r), ensure_ascii=False) + "\n")
                count += 1
    finally:
        if f is not None:
            f.close()
    return count, conflicts


def replay_pool(config: PoolConfig, names: set[str]) -> dict:
    """The pool as replay experts (those in ``names``): names, categories, params, prices and
    strengths kept; file paths the yaml names made absolute; an llm aggregator turned into a
    vote, since a replayed aggregator could only repeat itself."""
    experts = []
    for e in config.experts:
        if e.name in names:
            d = e.model_dump(include=_KEEP, exclude_none=True)
            experts.append({"name": e.name, "backend": "replay", "model": f"replay/{e.name}.jsonl",
                            **{k: v for k, v in d.items() if k != "name"}})
    raw = config.model_dump(include={"categories", "router", "aggregator", "embeddings"},
                            exclude_none=True)
    raw["categories"] = {c: {**v, "experts": [n for n in v["experts"] if n in names]}
                         for c, v in raw.get("categories", {}).items()}
    for field in ("model_file", "profiles"):
        if raw["router"].get(field):
            raw["router"][field] = str(config.resolve_path(raw["router"][field]).resolve())
    emb = raw["embeddings"]["model"]
    static, _, source = emb.partition(":") if emb.startswith("static") else ("", "", emb)
    if source and not source.startswith("package:"):  # a folder: absolute
        source = str(config.resolve_path(source).resolve())
        raw["embeddings"]["model"] = f"{static}:{source}" if static else source
    if raw["aggregator"].get("profiles"):
        raw["aggregator"]["profiles"] = str(config.resolve_path(raw["aggregator"]["profiles"]).resolve())
    if raw["aggregator"].get("kind") == "llm":
        raw["aggregator"] = {"kind": "vote"}
    elif raw["aggregator"].get("expert") not in names:
        raw["aggregator"].pop("expert", None)
    return {"experts": experts, **raw}
