"""Replay: responses come from a recorded JSONL file (``{"id": ..., "text": ...}`` per line).

A record may also hold ``"answer"``: the answer extracted when it was recorded (null for none).
It is then used as-is, so re-scoring a recorded run gives exactly the recorded figures. So do
``"finish_reason"`` and ``"truncated_by"``: an answer recorded as cut off replays as cut off.

Used to research routing on recorded outputs of real models with no GPU, and to re-score an
evaluation exactly. ``coe eval --record DIR`` writes such files.
"""

from __future__ import annotations

import json
from typing import Literal

from coe.config import ExpertConfig
from coe.errors import ExpertError
from coe.experts.base import Backend, Generation, GenRequest, OnResult
from coe.model_ref import file_fingerprint, resolve_model_file


class ReplayExpert(ExpertConfig):
    """Responses come from a recorded JSONL file: one ``{"id", "text"}`` per question."""

    backend: Literal["replay"]


class ReplayBackend(Backend):
    config_model = ReplayExpert
    cacheable = False  # already a record
    keyed_by_question = True

    @classmethod
    def check(cls, config, base_dir) -> None:
        resolve_model_file(config.model, base_dir or ".", suffix=".jsonl")

    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self.records: dict[str, dict] | None = None

    @property
    def path(self):
        return resolve_model_file(self.config.model, self.base_dir or ".", suffix=".jsonl")

    def estimate_bytes(self) -> int:
        """The recorded file's size x 3: parsed into dicts of Python strings it takes 2.5 x its
        size in memory (measured on 20,000 records of 400 characters), more for short ones."""
        return self.path.stat().st_size * 3

    def fingerprint(self) -> str:
        return f"replay:{file_fingerprint(self.path)}"

    def load(self) -> None:
        records: dict[str, dict] = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    records[str(rec["id"])] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ExpertError(self.config.name,
                                      f"{self.path}:{lineno}: not a {{id, text}} record") from None
                if rec.get("truncated_by") not in (None, "max_tokens", "context"):
                    raise ExpertError(self.config.name, f"{self.path}:{lineno}: truncated_by "
                                      f"must be max_tokens, context or null")
        self.records = records

    def generate(self, requests: list[GenRequest], on_result: OnResult) -> None:
        for i, r in enumerate(requests):
            rec = self.records.get(r.question_id)
            if rec is None:
                on_result(i, Generation(error=f"no recorded response for question {r.question_id!r}"))
                continue
            on_result(i, Generation(text=rec.get("text") or "",
                                    has_recorded_answer="answer" in rec,
                                    recorded_answer=rec.get("answer"),
                                    prompt_tokens=int(rec.get("prompt_tokens", 0)),
                                    completion_tokens=int(rec.get("completion_tokens", 0)),
                                    seconds=float(rec.get("seconds", 0.0)),
                                    finish_reason=rec.get("finish_reason"),
                                    truncated_by=rec.get("truncated_by")))

    def unload(self) -> None:
        self.records = None
