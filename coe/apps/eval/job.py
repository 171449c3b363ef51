"""``coe eval`` as a function: load the pool and the questions, evaluate, write the report
(and with ``record_dir`` the replay files). The CLI command only parses options and prints."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from coe.apps.eval.record import write_replay
from coe.apps.eval.report import write_report
from coe.apps.eval.runner import EvalOptions, EvalResult, evaluate
from coe.apps.eval.strategies import parse_budget
from coe.core.config import PoolConfig, load_config
from coe.core.errors import ConfigError
from coe.core.types import Question
from coe.io.output import check_output
from coe.io.questions import load_questions

REPORT_FILES = ("report.md", "report.json", "outcomes.jsonl", "recommended.yaml",
                "accuracy.png", "categories.png", "usage.png",
                "cost.png")  # what coe.apps.eval.report writes


def parse_budgets(text: str) -> tuple[tuple[float, str], ...]:
    """``--budgets``: comma-separated ``parse_budget`` forms ("2,3,mean:3")."""
    try:
        return tuple(parse_budget(b) for b in text.split(",") if b.strip())
    except ValueError as e:
        raise ConfigError(f"--budgets: {e}") from None


def check_eval_outputs(cfg: PoolConfig, out: Path, record: Path | None, inputs: list) -> None:
    """Before any model loads: the files ``coe eval`` will write can be written and none of
    them is one of its inputs (``(what, path)`` pairs)."""
    for name in REPORT_FILES:
        check_output(out / name, inputs, what="report")
    if record is not None:
        check_output(record / "experts.yaml", inputs, what="recorded replay pool")
        for e in cfg.experts:
            check_output(record / "replay" / f"{e.name}.jsonl", inputs, what="recorded replay file")


def run_eval_job(questions: str | Path | list[Question], config: str | Path | PoolConfig, *,
                 out_dir: str | Path | None,
                 validation: str | Path | None = None, record_dir: str | Path | None = None,
                 plots: bool = True, skip_invalid: bool = False,
                 log: Callable[[str], None] | None = None,
                 **options) -> tuple[EvalResult, list[Path], dict | None]:
    """Returns (result, report files written, record summary or None). ``questions``: a
    file, or its questions already loaded (``load_test``)."""
    cfg = config if isinstance(config, PoolConfig) else load_config(config)
    test = questions if isinstance(questions, list) else load_test(questions, skip_invalid, log)
    val = None
    if validation is not None:
        val = load_questions(validation, skip_invalid=skip_invalid).questions
    opts = EvalOptions(validation=val, validation_source=str(validation) if validation else "",
                       log=log, keep_texts=record_dir is not None, **options)
    result = evaluate(cfg, test, opts)
    files = write_report(result, out_dir, plots=plots) if out_dir is not None else []
    recorded = None
    if record_dir is not None:
        recorded = write_replay(record_dir, cfg, [(result.questions, result.responses),
                                                  (result.validation, result.val_responses)])
    return result, files, recorded


def run_judged_eval(questions: str | Path, cfg: PoolConfig, *, validation: str | Path | None,
                    out_dir: str | Path, seed: int = 0, plots: bool = True,
                    strategies: str | list[str] | None = None,
                    log: Callable[[str], None] | None = None,
                    echo: Callable[[str], None] | None = None, live=None,
                    test: list[Question] | None = None, unused: dict[str, bool] | None = None):
    """``coe eval`` on a pairwise-judged pool (``coe.apps.eval.judged``) when every test
    question is ``kind: free``; None otherwise (the ordinary evaluation then runs). The
    training half is ``--validation``, else the pool's ``train.jsonl``; ``strategies``: names or
    patterns to keep (best-single always is: the reference). ``echo`` prints the
    test table, ``log`` the report's files. ``live`` (``judged_live.LiveJudging``,
    ``--judge``): a judge's trust and what it judges beside; refused unless the pool is
    judged. ``test``: the questions of ``questions`` already loaded. ``unused``: options of
    the ordinary evaluation (name -> given), each refused in one line on a judged pool."""
    from coe.apps.eval.judged import JudgedEvaluation
    from coe.apps.eval.judged_report import FILES, table, write_judged_report

    test = load_questions(questions).questions if test is None else test
    if not test or any(q.kind != "free" for q in test):
        if live is not None:
            raise ConfigError(f"--judge: only on a pairwise-judged pool (coe pool on an "
                              f"AlpacaEval-style folder); {questions} holds questions that "
                              "are not free text")
        return None
    bad = [name for name, given in (unused or {}).items() if given]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not used on a pairwise-judged pool (it scores "
                          "recorded answers, every strategy fixed; see README, Open-ended "
                          "evaluation)")
    val_path = Path(validation) if validation else cfg.base_dir / "train.jsonl"
    if not val_path.is_file():
        raise ConfigError(f"{val_path}: a judged pool is evaluated against its training half: "
                          "give --validation TRAIN.jsonl")
    for name in FILES:
        check_output(Path(out_dir) / name, [("question file", questions),
                                            ("validation file", val_path)], what="report")
    if log:
        log(f"pairwise-judged pool: {len(test)} test instructions; choosing on {val_path}")
    if live is not None:
        from coe.apps.eval.judged_live import check, run_live

        check(cfg, live)  # before anything is computed
    ev = JudgedEvaluation(recorded_only(cfg), load_questions(val_path).questions, test,
                          seed=seed, log=log, strategies=strategies).run()
    if live is not None:
        ev.judge = run_live(ev, cfg, live, log=log or echo)
    files = write_judged_report(ev, out_dir, cfg.source, plots=plots)
    if echo:
        echo(table(ev, "test"))
    if log:
        log(f"recommendation: {ev.recommendation.strategy}")
        log(f"report: {', '.join(str(f) for f in files)}")
    return ev, files


def print_eval(result: EvalResult, files, recorded, echo: Callable[[str], None],
               err: Callable[[str], None]) -> None:
    """What ``coe eval`` prints: the tables (``echo``), the summary and files (``err``)."""
    from coe.apps.eval.report import comparison_table, strategy_table, summary_lines
    from coe.core.wording import counted

    echo(strategy_table(result))
    table = comparison_table(result)
    if table:
        echo("\npaired comparison with best-single (validation chooses; test checks):")
        echo(table)
    for line in summary_lines(result):
        err(line)
    err(f"report: {', '.join(str(f) for f in files)}")
    if recorded:
        err(f"recorded replay pool: {recorded['dir']}/experts.yaml "
            f"({counted(sum(recorded['records'].values()), 'record')})")
    for name, msg in result.stats.failures.items():
        err(f"expert {name!r} failed: {msg}")


def load_test(questions: str | Path, skip_invalid: bool,
              log: Callable[[str], None] | None) -> list[Question]:
    """The test questions of ``coe eval``, loaded once; each skipped line logged."""
    report = load_questions(questions, skip_invalid=skip_invalid)
    for line in report.skipped:
        if log:
            log(f"skipped {line}")
    return report.questions


def live_judging(cfg: PoolConfig, judge: str | None, sample: int, limit: int,
                 aggregator: str | None, cache: bool):
    """``--judge`` and its options as a ``LiveJudging`` (None without ``--judge``); an option
    of it given without what it needs is refused in one line, not ignored."""
    from coe.apps.eval.judged_live import LiveJudging

    if judge is None:
        bad = [n for n, on in (("--judge-sample", sample != LiveJudging.sample),
                               ("--judge-limit", limit != LiveJudging.limit)) if on]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: only with --judge EXPERT")
        return None
    aggregator = aggregator or cfg.aggregator.expert
    if aggregator is None and limit != LiveJudging.limit:
        raise ConfigError("--judge-limit: the instructions of knn3+fuse, which needs the expert "
                          "that fuses (--aggregator-expert, or the yaml's aggregator.expert)")
    return LiveJudging(judge, sample, limit, aggregator, cache=cache)


def recorded_only(cfg: PoolConfig) -> PoolConfig:
    """The pool without its generating experts (a judge, an aggregator added to a judged
    pool's yaml): the judged strategies choose among recorded answers only."""
    from coe.core.registry import BACKENDS

    keep = [e for e in cfg.experts if BACKENDS.get(e.backend).capabilities_for(e).replay_only]
    return cfg if len(keep) == len(cfg.experts) else cfg.model_copy(update={"experts": keep})
