"""Replay: responses come from a recorded JSONL file (``{"id": ..., "text": ...}`` per line).

A record may also hold ``"answer"``: the answer extracted when it was recorded (null for none).
It is then used as-is, so re-scoring a recorded run gives exactly the recorded figures. So do
``"finish_reason"`` and ``"truncated_by"``: an answer recorded as cut off replays as cut off.

Used to research routing on recorded outputs of real models with no GPU, and to re-score an
evaluation exactly. ``coe eval --record DIR`` writes such files.

Loading reads the whole file once and checks every record (a bad line is an error naming the
file and line, as it would be for any model that cannot load), but keeps only an index: the
byte offset of each question id's line (the last one, when an id repeats). ``generate`` reads
the records it is asked for, one by one, in the order asked. So a loaded replay holds about a
hundred bytes per record, not the recorded texts: a pool of 8 files of 100,000 records each
is evaluated without ever holding more than the records of the batch being answered. The
response does not depend on the prompt (``Capabilities.replay_only``): a caller may send requests
without one.
"""

from __future__ import annotations

import json
from typing import Literal

from coe.backends.base import Backend, Capabilities, Generation, GenRequest, OnResult
from coe.core.config import ExpertConfig
from coe.core.errors import ExpertError
from coe.io.model_ref import file_fingerprint, local_file, resolve_model_file

TRUNCATED_BY = (None, "max_tokens", "context")
_decode = json.JSONDecoder().decode  # json.loads without its per-call checks


class ReplayExpert(ExpertConfig):
    """Responses come from a recorded JSONL file: one ``{"id", "text"}`` per question."""

    backend: Literal["replay"]


class ReplayBackend(Backend):
    config_model = ReplayExpert
    # a record: never cached, answers by question id, the prompt unread (so it honours no
    # tools, response format or logprobs: it can only say what was recorded)
    capabilities = Capabilities(replay_only=True, cacheable=False)

    @classmethod
    def check(cls, config, base_dir) -> None:
        resolve_model_file(config.model, base_dir or ".", suffix=".jsonl")

    @classmethod
    def reads(cls, config, base_dir) -> list:
        path = local_file(config.model, base_dir or ".")
        return [path] if path is not None else []

    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self.index: dict[str, int] | None = None  # question id -> byte offset of its record

    @property
    def path(self):
        return resolve_model_file(self.config.model, self.base_dir or ".", suffix=".jsonl")

    def estimate_bytes(self) -> int:
        """A quarter of the file: the index holds about 125 bytes per record (its id, its
        offset, a dict slot), and recorded answers are rarely much shorter than 500 bytes
        (the MMLU-Pro files average 390 to 1,000 bytes a record: 12 to 32 % of their size)."""
        return self.path.stat().st_size // 4

    def fingerprint(self) -> str:
        return f"replay:{file_fingerprint(self.path)}"

    def _record(self, line: bytes, where: str) -> dict:
        try:
            rec = _decode(line.decode("utf-8"))
            str(rec["id"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ExpertError(self.config.name, f"{where}: not a {{id, text}} record") from None
        if rec.get("truncated_by") not in TRUNCATED_BY:
            raise ExpertError(self.config.name, f"{where}: truncated_by "
                              f"must be max_tokens, context or null")
        return rec

    def load(self) -> None:
        index: dict[str, int] = {}
        path = self.path
        offset = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    index[str(self._record(line, f"{path}:{lineno}")["id"])] = offset
                offset += len(line)
        self.index = index

    def generate(self, requests: list[GenRequest], on_result: OnResult) -> None:
        path = self.path
        with open(path, "rb") as f:
            for i, r in enumerate(requests):
                offset = self.index.get(r.question_id)
                if offset is None:
                    on_result(i, Generation(
                        error=f"no recorded response for question {r.question_id!r}"))
                    continue
                f.seek(offset)
                try:
                    rec = self._record(f.readline(), str(path))
                    moved = str(rec["id"]) != r.question_id
                except ExpertError:
                    moved = True
                if moved:  # the file was rewritten since it was loaded
                    raise ExpertError(self.config.name, f"{path} changed while it was replayed "
                                      f"(the record of question {r.question_id!r} is no longer "
                                      f"at byte {offset})")
                on_result(i, Generation(text=rec.get("text") or "",
                                        has_recorded_answer="answer" in rec,
                                        recorded_answer=rec.get("answer"),
                                        prompt_tokens=int(rec.get("prompt_tokens", 0)),
                                        completion_tokens=int(rec.get("completion_tokens", 0)),
                                        seconds=float(rec.get("seconds", 0.0)),
                                        finish_reason=rec.get("finish_reason"),
                                        truncated_by=rec.get("truncated_by")))

    def unload(self) -> None:
        self.index = None
