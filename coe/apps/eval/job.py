"""``coe eval`` as a function: load the pool and the questions, evaluate, write the report
(and with ``record_dir`` the replay files). The CLI command only parses options and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from coe.apps.eval.record import write_replay
from coe.apps.eval.report import write_report
from coe.apps.eval.runner import EvalOptions, EvalResult, evaluate
from coe.core.config import PoolConfig, load_config
from coe.io.questions import load_questions


def run_eval_job(questions: str | Path, config: str | Path | PoolConfig, *,
                 out_dir: str | Path | None,
                 validation: str | Path | None = None, record_dir: str | Path | None = None,
                 plots: bool = True, skip_invalid: bool = False,
                 log: Callable[[str], None] | None = None,
                 **options) -> tuple[EvalResult, list[Path], dict | None]:
    """Returns (result, report files written, record summary or None)."""
    cfg = config if isinstance(config, PoolConfig) else load_config(config)
    report = load_questions(questions, skip_invalid=skip_invalid)
    for line in report.skipped:
        if log:
            log(f"skipped {line}")
    val = None
    if validation is not None:
        val = load_questions(validation, skip_invalid=skip_invalid).questions
    opts = EvalOptions(validation=val, validation_source=str(validation) if validation else "",
                       log=log, keep_texts=record_dir is not None, **options)
    result = evaluate(cfg, report.questions, opts)
    files = write_report(result, out_dir, plots=plots) if out_dir is not None else []
    recorded = None
    if record_dir is not None:
        recorded = write_replay(record_dir, cfg, [(result.questions, result.responses),
                                                  (result.validation, result.val_responses)])
    return result, files, recorded
