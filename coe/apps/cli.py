"""The ``coe`` command line. The only module that imports typer.

User errors (``CoeError``) print one line and exit non-zero, without a traceback.
"""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from coe.core import progress
from coe.core.config import load_config
from coe.core.errors import CoeError, StorageError
from coe.core.registry import AGGREGATORS, EXECUTORS, ROUTERS
from coe.core.secrets import redact
from coe.core.wording import counted

# click's plain help: rich's panels cut option help at 80 columns when stdout is not a terminal;
# plain help wraps every word, as wide as the terminal (at most 120 columns, else 80)
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"max_content_width": 120},
                  help="Composition of Experts: route questions to a team of LLMs and aggregate.")

ConfigOpt = typer.Option(Path("experts.yaml"), "--config", "-c", help="experts yaml")
ExecutorOpt = typer.Option(None, "--executor", help=f"{' | '.join(EXECUTORS.names())} "
                           "(default: yaml executor.kind, else local)")
ROUTER_HELP = f"{' | '.join(ROUTERS.names())} (default: yaml)"
AGGREGATOR_HELP = f"{' | '.join(AGGREGATORS.names())} (default: yaml)"


def err(msg: str) -> None:
    typer.echo(redact(msg), err=True)  # every form of every secret the run came to know


def _config(path: Path, executor: Optional[str]):
    return load_config(path).with_executor(executor)


def _load(questions: Path, skip_invalid: bool):
    from coe.io.questions import load_questions

    report = load_questions(questions, skip_invalid=skip_invalid)
    for line in report.skipped:
        err(f"skipped {line}")
    return report.questions


@app.command(short_help="Answer questions with a team of experts.")
def run(
    questions: Path = typer.Argument(..., help="questions: .jsonl, .json or .csv; - for stdin"),
    config: Path = ConfigOpt,
    router: Optional[str] = typer.Option(None, help=ROUTER_HELP),
    aggregator: Optional[str] = typer.Option(None, help=AGGREGATOR_HELP),
    k: Optional[int] = typer.Option(None, "-k", min=1, help="recruit at most k experts"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="answers JSONL (default: stdout)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="show routes and the plan, generate nothing"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="response cache (makes reruns resume)"),
    resume: bool = typer.Option(False, "--resume", help="keep answers already in --output"),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="stop at the first failing expert"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="report bad lines and go on"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    executor: Optional[str] = ExecutorOpt,
):
    """Answer every question with the recruited experts and aggregate their answers."""
    from coe.apps.api import Orchestrator, unique_ids
    from coe.io.output import ResultWriter, check_output
    from coe.pipeline.preflight import files_read
    from coe.pipeline.results import result_responses, truncation_warning

    progress.enable(not quiet)
    cfg = _config(config, executor)
    writer = None
    if output is not None and not dry_run:  # before anything is read, loaded or generated
        check_output(output, [("question file", questions), *files_read(cfg, cache)])
    qs = _load(questions, skip_invalid)
    if output is not None and not dry_run:  # held until the run ends: one writer at a time
        writer = ResultWriter(output, resume=resume, questions=unique_ids(qs))
    try:
        with Orchestrator(cfg, router=router, aggregator=aggregator, k=k, cache=cache,
                          progress=not quiet, fail_fast=fail_fast) as orch:
            if dry_run:
                dry = orch.dry_run(qs)
                for r in dry.routes:
                    err(f"{r.question_id}: {', '.join(r.names)}  [{r.reason}]")
                err(dry.plan.describe())
                for note in dry.notes:
                    err(note)
                return
            result = orch.run(qs, output=writer, resume=resume,
                              on_plan=None if quiet else lambda plan: err(plan.describe()))
    finally:
        if writer is not None:
            writer.close()
    if output is None:
        for r in result.results:
            sys.stdout.write(r.model_dump_json() + "\n")
    s = result.stats
    err(f"{counted(len(result.results), 'question')} answered"
        + (f" ({result.resumed} already in {output})" if result.resumed else "")
        + f" in {result.wall_seconds:.1f}s; model loads: {s.loads} "
        f"(naive per-question order: {s.naive_loads}); generations: {s.generations}, "
        f"cached: {s.cache_hits}, failed: {s.failed_generations}")
    if result.accuracy_line():
        err(result.accuracy_line())
    cut = truncation_warning(result_responses(result.results))
    if cut:
        err(cut)
    for name, msg in s.failures.items():
        err(f"expert {name!r} failed: {msg}")
    if s.failures:
        raise typer.Exit(4)


@app.command()
def experts(config: Path = ConfigOpt,
            check: bool = typer.Option(False, "--check", help="also resolve every model file "
                                       "and API key env var (loads nothing)")):
    """List and validate the expert pool."""
    from coe.pipeline.preflight import check_pool

    cfg = load_config(config)
    for e in cfg.experts:
        cats = ",".join(e.categories) or "-"
        typer.echo(f"{e.name:<24} {e.backend:<9} {e.prompt_format:<10} {e.model:<40} {cats}")
    cmap = {c: cfg.category_experts(c) for c in cfg.category_names()}
    for c, names in cmap.items():
        typer.echo(f"category {c}: {', '.join(names) or '(none: default experts)'}")
    if check:
        check_pool(cfg)
        typer.echo(f"{config}: {counted(len(cfg.experts), 'expert')} OK")


@app.command("eval", short_help="Compare strategies on questions with gold answers.")
def eval_cmd(
    questions: Path = typer.Argument(..., help="questions with gold answers: .jsonl, .json, .csv"),
    config: Path = ConfigOpt,
    strategies: Optional[str] = typer.Option(
        None, "--strategies", "-s", help="comma-separated names or patterns, e.g. "
        "'single:*,best-single,*+vote,oracle' (default: every available strategy)"),
    validation: Optional[Path] = typer.Option(
        None, "--validation", help="questions to pick best-single on (default: a seeded split)"),
    val_fraction: float = typer.Option(0.5, "--val-fraction", min=0.0, max=0.9,
                                       help="without --validation: share held out to pick "
                                       "best-single; the rest is the test set"),
    seed: int = typer.Option(0, "--seed", help="seed of the validation split and random-k"),
    random_k: int = typer.Option(3, "--random-k", min=1, help="experts of the random baseline"),
    k: Optional[int] = typer.Option(None, "-k", min=1, help="the routers recruit at most k "
                                    "experts (default: yaml router.k; all+... stays the pool)"),
    budgets: str = typer.Option("2,3", "--budgets", help="cascades to evaluate, comma-separated "
                                "('' for none): B (knn+learned~B) asks at most B experts for any "
                                "question; mean:B (knn+learned~meanB) B on average"),
    aggregator_expert: Optional[str] = typer.Option(None, "--aggregator-expert",
                                                    help="expert of the llm strategies"),
    out: Path = typer.Option(Path("runs/eval"), "--out", "-o", help="report directory"),
    record: Optional[Path] = typer.Option(None, "--record", help="write replay files here"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="write the PNG plots"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="response cache"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed job from the cache"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="report bad lines and go on"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no plan or progress bars"),
    executor: Optional[str] = ExecutorOpt,
    judge: Optional[str] = typer.Option(None, "--judge", help="judged pool: an expert judging "
                                        "answers against the reference (README)"),
    judge_sample: int = typer.Option(40, "--judge-sample", min=1, help="its trust sample"),
    judge_limit: int = typer.Option(40, "--judge-limit", min=1, help="knn3+fuse instructions"),
):
    """Compare strategies (single experts, best single, routers x aggregators, random-k,
    oracle) on questions with gold answers; each generation is made once and shared."""
    from coe.apps.eval import job
    from coe.pipeline.preflight import files_read

    progress.enable(not quiet)
    cfg = _config(config, executor)
    live = job.live_judging(cfg, judge, judge_sample, judge_limit, aggregator_expert, cache)
    test = job.load_test(questions, skip_invalid, None if quiet else err)
    if k is not None:  # as coe run -k: the yaml's router.k, so recommended.yaml keeps it
        cfg = cfg.model_copy(update={"router": cfg.router.model_copy(update={"k": k})})
    if job.run_judged_eval(questions, cfg, validation=validation, out_dir=out, seed=seed,
                           plots=plots, strategies=strategies, log=None if quiet else err,
                           echo=typer.echo, live=live, test=test, unused={
        "--val-fraction": val_fraction != 0.5, "--random-k": random_k != 3, "-k": k is not None,
        "--budgets": budgets != "2,3", "--record": record is not None, "--resume": resume,
        "--skip-invalid": skip_invalid,
        "--aggregator-expert": aggregator_expert is not None and live is None}):
        return  # a pairwise-judged pool (coe.apps.eval.judged): its table and report printed
    job.check_eval_outputs(cfg, out, record, [("question file", questions),
                                              ("validation file", validation),
                                              *files_read(cfg, cache)])
    result, files, recorded = job.run_eval_job(
        test, cfg, out_dir=out, validation=validation, record_dir=record, plots=plots,
        skip_invalid=skip_invalid, log=None if quiet else err, strategies=strategies,
        val_fraction=val_fraction, seed=seed, random_k=random_k,
        budgets=job.parse_budgets(budgets),
        aggregator_expert=aggregator_expert, cache=cache, resume=resume, progress=not quiet)
    job.print_eval(result, files, recorded, typer.echo, err)
    if result.stats.failures:  # like `coe run`; the report is written
        raise typer.Exit(4)


@app.command(short_help="Build a replay pool from recorded outputs.")
def pool(
    source: Path = typer.Argument(..., help="folder of recorded outputs: MMLU-Pro .zip/.json "
                                  "files, or questions.jsonl + outputs/<model>.jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="pool folder to write"),
    experts: Optional[str] = typer.Option(
        None, "--experts", help="comma-separated model names or shell patterns, in pool order "
        "(default: every model of SOURCE)"),
    seed: int = typer.Option(0, "--seed", help="seed of the train/test split"),
    top_per_category: int = typer.Option(3, "--top-per-category", min=1,
                                         help="experts per category (and default) in the yaml"),
    params: Optional[list[str]] = typer.Option(
        None, "--params", help="NAME=BILLIONS, repeatable or comma-separated (known for the "
        "8 shared MMLU-Pro models)"),
    fmt: str = typer.Option("auto", "--format", help="auto | mmlu-pro | generic"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress lines"),
):
    """Build a replay pool from recorded outputs: train.jsonl / test.jsonl (seeded 50/50
    split), replay/<model>.jsonl and experts.yaml (strengths = train-half accuracy)."""
    from coe.apps.eval.pools import build_pool, parse_params
    from coe.apps.eval.recorded import PoolSourceError

    if fmt not in ("auto", "mmlu-pro", "generic"):
        raise PoolSourceError(f"--format {fmt!r}: expected auto, mmlu-pro or generic")
    summary = build_pool(source, out, seed=seed, top_per_category=top_per_category,
                         experts=experts, params=parse_params(params), fmt=fmt,
                         log=None if quiet else err)
    typer.echo(f"{'expert':<28} {'train ' + ('WR' if summary['format'] == 'judged' else 'acc'):>9} {'params':>7}")
    for name, s in sorted(summary["accuracy"].items(), key=lambda kv: -kv[1]):
        b = summary["params"][name]  # the unrounded accuracy, rounded once, here
        typer.echo(f"{name:<28} {s:>9.1%} {(f'{b:g}B' if b is not None else '-'):>7}")
    err(f"{out / 'experts.yaml'}: {counted(len(summary['strength']), 'replay expert')}, "
        f"{counted(summary['questions'], summary['format'] + ' question')} "
        f"(train {summary['train']:,}, test {summary['test']:,})")


@app.command(short_help="Build or extend model profiles on validation questions.")
def profile(
    validation: Path = typer.Argument(..., help="questions with gold answers"),
    config: Path = ConfigOpt,
    output: Path = typer.Option(Path("profiles.json"), "--output", "-o", help="profiles JSON"),
    skills: Optional[str] = typer.Option(None, help="vocabulary | keywords (default: yaml router.skills)"),
    aggregators: Optional[str] = typer.Option(
        None, help="comma-separated experts to measure as aggregators (default: all non-replay)"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="response cache"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="report bad lines and go on"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    executor: Optional[str] = ExecutorOpt,
):
    """Build (or extend) model profiles: per-skill and global accuracy of every expert, and
    each aggregator candidate's aggregation accuracy, on a validation set."""
    from coe.apps.profile import build_profiles
    from coe.io.output import check_output
    from coe.learned.profiles import Profiles
    from coe.pipeline.preflight import PROFILES, files_read

    progress.enable(not quiet)
    cfg = _config(config, executor)
    # the profiles and their validation record (extending them is what this command does)
    inputs = [("validation file", validation), *files_read(cfg, cache, produces=(PROFILES,))]
    for path in (output, output.with_suffix(".npz")):
        check_output(path, inputs, what="profiles")
    qs = _load(validation, skip_invalid)
    existing = Profiles.load(output) if output.exists() else None
    aggs = [a.strip() for a in aggregators.split(",") if a.strip()] if aggregators is not None else None
    prof = build_profiles(cfg, qs, existing=existing, skills=skills, aggregators=aggs, cache=cache,
                          progress=not quiet, log=err)
    prof.save(output)
    typer.echo(f"{'expert':<28} {'accuracy':>8} {'n':>6}  strongest skills")
    for name, p in prof.experts.items():
        norm = {s: v / p.seen[s] for s, v in p.skills.items() if p.seen[s] >= 1}
        best = sorted(norm, key=lambda s: -norm[s])[:3]
        typer.echo(f"{name:<28} {p.accuracy:>8.1%} {p.total:>6}  {', '.join(best)}")
    for name, a in prof.aggregators.items():
        typer.echo(f"aggregator {name:<17} {a.accuracy:>8.1%} {a.total:>6}")
    typer.echo(f"{output}: {counted(len(prof.questions), 'question')}, skills from "
               f"{prof.skill_source}")


@app.command("train-router", short_help="Train the category classifier of CoE routing.")
def train_router(
    labeled: Path = typer.Argument(..., help="questions with a 'category' field"),
    output: Path = typer.Option(Path("router.joblib"), "--output", "-o", help="router file"),
    test: Optional[Path] = typer.Option(None, "--test", help="held-out questions (default: a split)"),
    test_fraction: float = typer.Option(0.2, min=0.05, max=0.9, help="held out when no --test"),
    seed: int = typer.Option(0, help="seed of the split"),
    estimator: str = typer.Option("logreg", help="logreg | knn | svm"),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="experts yaml: its embedding model, category check"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="report bad lines and go on"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
):
    """Train the category classifier of Composition-of-Experts routing; prints held-out
    accuracy and a confusion matrix. Use it with `router: {kind: category, model_file: ...}`."""
    from coe.core.config import EmbeddingConfig
    from coe.io.output import check_output
    from coe.learned.classifier import train_category_router
    from coe.pipeline.preflight import ROUTER_FILE, files_read

    progress.enable(not quiet)
    cfg = load_config(config) if config else None
    inputs = [("labelled questions", labeled), ("test questions", test)]
    if cfg is not None:  # the router file is what this command makes
        inputs += files_read(cfg, produces=(ROUTER_FILE,))  # its cache too: never destroyed
    check_output(output, inputs, what="router file")
    emb = cfg.embeddings if cfg else EmbeddingConfig()
    qs = _load(labeled, skip_invalid)
    held = _load(test, skip_invalid) if test else None
    clf, report = train_category_router(qs, held, test_fraction, seed, estimator, emb.model,
                                        str(cfg.base_dir) if cfg else ".")
    if cfg is not None:
        clf.check_categories(cfg, str(output))
    clf.save(output)
    typer.echo(report.table())
    typer.echo(f"{output}: {estimator} over {len(clf.labels)} categories")


@app.command(short_help="Show each question's route, generating nothing.")
def route(
    questions: Path = typer.Argument(..., help="questions: .jsonl, .json or .csv"),
    config: Path = ConfigOpt,
    router: Optional[str] = typer.Option(None, help=ROUTER_HELP),
    k: Optional[int] = typer.Option(None, "-k", min=1, help="recruit at most k experts"),
    as_json: bool = typer.Option(False, "--json", help="one JSON route per line"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="report bad lines and go on"),
):
    """Show each question's route (experts, category or skills, confidence, why) without
    generating any answer."""
    from coe.apps.api import Orchestrator

    qs = _load(questions, skip_invalid)
    with Orchestrator.from_yaml(config, router=router, k=k, cache=False) as orch:
        with orch.executor.session() as stats:
            routes = orch.route(qs)
        loads = stats.loads
    for r in routes:
        if as_json:
            typer.echo(r.model_dump_json())
        else:
            experts = ", ".join(f"{e.name} {e.weight:.2f}" for e in r.experts)
            conf = f"{r.confidence:.2f}" if r.confidence is not None else "-"
            typer.echo(f"{r.question_id}\t{experts}\tconfidence {conf}\t{r.reason}")
    err(f"{counted(len(routes), 'route')}; model loads for routing: {loads}")


@app.command(short_help="Serve the pool as an OpenAI-compatible API.")
def serve(
    config: Path = ConfigOpt,
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
    port: int = typer.Option(8000, min=1, max=65535, help="port"),
    batch_window_ms: float = typer.Option(20.0, "--batch-window-ms", min=0.0,
                                          help="collect requests this long into one batch"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="requests per batch at most"),
    max_queue: int = typer.Option(256, "--max-queue", min=1,
                                  help="requests waiting for a batch at most (then 429)"),
    request_timeout: float = typer.Option(600.0, "--request-timeout", min=0.1,
                                          help="seconds a request may wait for its answer (504)"),
    max_body_bytes: int = typer.Option(1_000_000, "--max-body-bytes", min=1,
                                       help="largest request body (413)"),
    idle_timeout: float = typer.Option(15.0, "--idle-timeout", min=0.1,
                                       help="seconds a connection may stay open with no "
                                       "request in progress (headers still coming included)"),
    max_connections: int = typer.Option(512, "--max-connections", min=1,
                                        help="connections open at once (more are closed)"),
    api_key_env: Optional[str] = typer.Option(
        None, "--api-key-env", help="require 'Authorization: Bearer <value of this variable>'"),
    log_prompts: bool = typer.Option(False, "--log-prompts", help="log each request's question"),
    max_resident_models: Optional[int] = typer.Option(
        None, "--max-resident-models", min=1, help="models loaded at once (default: yaml serve:)"),
    memory_gb: Optional[float] = typer.Option(
        None, "--memory-gb", min=0.01, help="memory the resident models may hold "
        "(default: yaml serve:, else half of this machine's)"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="response cache, shared with run"),
    executor: Optional[str] = ExecutorOpt,
):
    """Serve the pool as an OpenAI-compatible API (chat and text completions, streaming);
    requests arriving together are answered as one batch."""
    from coe.pipeline.preflight import check_pool

    try:
        from coe.apps.serve import ServeOptions, run_server
    except ImportError as e:
        raise CoeError(f"coe serve needs the serve extra (pip install 'coe[serve]'): {e}") from None
    cfg = _config(config, executor)
    check_pool(cfg)
    run_server(cfg, ServeOptions(
        host=host, port=port, batch_window_ms=batch_window_ms, max_batch=max_batch,
        max_queue=max_queue, request_timeout=request_timeout, max_body_bytes=max_body_bytes,
        api_key_env=api_key_env, log_prompts=log_prompts,
        max_resident_models=max_resident_models, memory_gb=memory_gb, cache=cache,
        idle_timeout=idle_timeout, max_connections=max_connections))


def _terminate(signum, frame):
    """SIGTERM is Ctrl-C: hand it to whatever handles SIGINT now. That is Python's own handler,
    which raises KeyboardInterrupt (files closed on the way out, finished work already on
    disk), or, while an asyncio loop runs (an API expert's requests), asyncio's, which cancels
    the running tasks first, so no task is left holding an exception nobody retrieves."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                  errno.EPERM, errno.EISDIR, errno.ENOTDIR}
INTERRUPTED = "interrupted: finished generations are in the response cache; rerun with --resume"


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C (and our SIGTERM) into a returned 130
            err(INTERRUPTED)
        if isinstance(code, int) and code:  # non-standalone click *returns* typer.Exit's code
            sys.exit(code)
    except CoeError as e:
        err(f"error: {e}")
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err(INTERRUPTED)
        sys.exit(130)
    except OSError as e:
        if e.errno not in STORAGE_ERRNOS:
            raise
        # a file written outside the checked paths (a report, profiles, a router file)
        err(f"error: {e.filename or 'a file being written'}: {e.strerror}")
        sys.exit(StorageError.exit_code)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors (typer's own click) in standalone_mode=False
        err(f"error: {e.format_message()} (see coe --help)")
        sys.exit(e.exit_code)
    except typer.Abort:  # typer's form of Ctrl-C
        err(INTERRUPTED)
        sys.exit(130)


if __name__ == "__main__":
    main()
