"""Files a run reads and writes, as a careless user or a hostile machine hands them over: an
output that is the input, a cache or an output that cannot be written, a disk that fills up
(a real one: ``/dev/full``, or a file-size limit, ``RLIMIT_FSIZE``, set in the child process),
answers kept by ``--resume`` for questions asked differently since, and question files that
are not files (a directory, a symlink loop, a socket, a FIFO, standard input).

Every case runs ``coe`` in a subprocess and checks the one line it prints, its exit code
(5: a file coe writes cannot be written) and what is left on disk. The tests may run as root,
which ignores file permissions: unwritable places are made of a path under a regular file,
a directory, ``/proc`` and the devices ``/dev/null`` and ``/dev/full``.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_jsonl
from tests.core.test_plugins_by_entry_point import plugin_dir  # noqa: F401  (a fixture: the echo backend plugin)
from tests.support.cli import one_line_error

REPO = Path(__file__).resolve().parents[2]
STORAGE = 5  # the exit code of a file coe cannot write


def coe(*args, stdin=None, env=None, file_size: int | None = None, timeout: float = 300):
    """``coe ARGS`` in a child process of this checkout; ``file_size`` caps the size of any file
    it writes (Python ignores SIGXFSZ, so a write past it fails with EFBIG: a full disk)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    return subprocess.run(
        [sys.executable, "-c", "from coe.apps.cli import main; main()", *map(str, args)], cwd=REPO,
        stdin=stdin if stdin is not None else subprocess.DEVNULL, capture_output=True,
        text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        preexec_fn=limit if file_size is not None else None, timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- defect 3: an output that is the input ------------------------------------------------

def test_an_output_that_is_the_input_is_refused_and_the_input_kept(replay_pool, tmp_path):
    cfg, qs = replay_pool
    before = qs.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(qs)
    os.link(qs, tmp_path / "hard.jsonl")
    for out in (qs, tmp_path / "link.jsonl", tmp_path / "hard.jsonl"):
        for resume in ((), ("--resume",)):
            one_line_error(coe("run", qs, "-c", cfg, "-q", "-o", out, *resume), STORAGE,
                           f"{out}: the answers file would overwrite the question file ({qs})")
    with open(tmp_path / "hard.jsonl", "rb") as stdin:  # coe run - < q.jsonl -o q.jsonl
        one_line_error(coe("run", "-", "-c", cfg, "-q", "-o", qs, stdin=stdin), STORAGE,
                       "would overwrite the question file (standard input)")
    one_line_error(coe("run", qs, "-c", cfg, "-q", "-o", cfg), STORAGE,
                   f"{cfg}: the answers file would overwrite the config ({cfg})")
    assert qs.read_bytes() == before
    # a terminal or a pipe is never "the same file": answers to stdout through -o work
    ok = coe("run", qs, "-c", cfg, "-q", "-o", "/dev/stdout")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.splitlines()) == 6


def test_eval_refuses_to_write_a_report_over_its_input(replay_pool, tmp_path):
    cfg, qs = replay_pool
    report = tmp_path / "report"
    report.mkdir()
    inside = report / "outcomes.jsonl"
    inside.write_bytes(qs.read_bytes())
    one_line_error(coe("eval", inside, "-c", cfg, "-q", "--no-plots", "-o", report), STORAGE,
                   f"{inside}: the report would overwrite the question file ({inside})")
    assert inside.read_bytes() == qs.read_bytes()
    # recording a replay pool over the one being evaluated
    rec = tmp_path / "recorded"
    rec.mkdir()
    pool = yaml.safe_load(cfg.read_text())
    for e in pool["experts"]:
        e["model"] = str(cfg.parent / e["model"])
    (rec / "experts.yaml").write_text(yaml.safe_dump(pool))
    one_line_error(coe("eval", qs, "-c", rec / "experts.yaml", "-q", "--no-plots", "-o", report,
                       "--record", rec), STORAGE,
                   f"{rec / 'experts.yaml'}: the recorded replay pool would overwrite the config")


def test_no_command_writes_over_a_file_the_pool_reads(replay_pool, tmp_path):
    """Every command that writes checks its output against every file it reads, the pool's
    included: a replay expert's recording, the response cache, the router file, the profiles
    and their validation record (through a symlink or a hard link too); ``coe train-router
    X -o X`` is refused. Each refusal comes before any work, and the file is kept."""
    cfg, qs = replay_pool
    cache = tmp_path / "cache.sqlite"
    pool = yaml.safe_load(cfg.read_text())
    pool.update(cache=str(cache), router={"kind": "all", "model_file": "router.joblib",
                                          "profiles": "profiles.json"})
    cfg.write_text(yaml.safe_dump(pool))
    recording = tmp_path / "alpha.jsonl"
    (tmp_path / "router.joblib").write_bytes(b"a trained router")
    (tmp_path / "profiles.json").write_text("{}")
    (tmp_path / "profiles.npz").write_bytes(b"a validation record")
    sqlite3.connect(cache).close()
    os.link(cache, tmp_path / "hard-link.jsonl")
    (tmp_path / "sym-link.jsonl").symlink_to(recording)
    before = {p: p.read_bytes() for p in (recording, cache, tmp_path / "router.joblib",
                                          tmp_path / "profiles.npz", qs)}
    for out, what in ((recording, f"the recording of expert 'alpha' ({recording})"),
                      (tmp_path / "sym-link.jsonl", "the recording of expert 'alpha'"),
                      (tmp_path / "hard-link.jsonl", f"the response cache ({cache})"),
                      (tmp_path / "router.joblib", "the router file"),
                      (tmp_path / "profiles.npz", "the validation record of the profiles")):
        one_line_error(coe("run", qs, "-c", cfg, "-q", "-o", out), STORAGE,
                       f"{out}: the answers file would overwrite {what}")
    (tmp_path / "rec" / "replay").mkdir(parents=True)
    os.link(recording, tmp_path / "rec" / "replay" / "alpha.jsonl")
    one_line_error(coe("eval", qs, "-c", cfg, "-q", "--no-plots", "-o", tmp_path / "report",
                       "--record", tmp_path / "rec"), STORAGE,
                   "the recorded replay file would overwrite the recording of expert 'alpha'")
    one_line_error(coe("train-router", qs, "-o", qs), STORAGE,
                   f"{qs}: the router file would overwrite the labelled questions ({qs})")
    one_line_error(coe("train-router", qs, "-c", cfg, "-o", cache), STORAGE,
                   f"{cache}: the router file would overwrite the response cache")
    one_line_error(coe("profile", qs, "-c", cfg, "-q", "-o", recording), STORAGE,
                   f"{recording}: the profiles would overwrite the recording of expert 'alpha'")
    assert {p: p.read_bytes() for p in before} == before


# -- defect 5: caches and outputs that cannot be written, a disk that fills ---------------

@pytest.mark.parametrize("where", ["cache dir is a file", "cache dir is /dev/null",
                                   "cache dir under a file", "cache file is a directory",
                                   "cache file is /dev/full"])
def test_an_unwritable_cache_is_one_line_before_any_model_loads(replay_pool, tmp_path, where):
    cfg, qs = replay_pool
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    env, pool = {}, yaml.safe_load(cfg.read_text())
    if where == "cache dir is a file":
        env["COE_CACHE_DIR"], shown = str(a_file), f"{a_file} is not a directory"
    elif where == "cache dir is /dev/null":
        env["COE_CACHE_DIR"], shown = "/dev/null", "/dev/null is not a directory"
    elif where == "cache dir under a file":
        env["COE_CACHE_DIR"], shown = str(a_file / "coe"), "Not a directory"
    elif where == "cache file is a directory":
        (tmp_path / "cache.sqlite").mkdir()
        pool["cache"], shown = str(tmp_path / "cache.sqlite"), "Is a directory"
    else:
        pool["cache"], shown = "/dev/full", "/dev/full: cannot write the response cache"
    cfg.write_text(yaml.safe_dump(pool))
    out = tmp_path / "answers.jsonl"
    # not quiet: the plan (printed before any model loads) must not appear
    proc = coe("run", qs, "-c", cfg, "-o", out, env=env)
    one_line_error(proc, STORAGE, "cannot write the response cache", shown)
    assert not out.exists()


@pytest.mark.parametrize("where", ["a directory", "under a regular file", "in /proc"])
def test_an_unwritable_output_is_found_before_any_generation(replay_pool, tmp_path, where):
    cfg, qs = replay_pool
    (tmp_path / "a-file").write_text("x")
    out, shown = {"a directory": (tmp_path, "Is a directory"),
                  "under a regular file": (tmp_path / "a-file" / "a.jsonl", "Not a directory"),
                  "in /proc": (Path("/proc/coe-answers.jsonl"), "")}[where]
    proc = coe("run", qs, "-c", cfg, "-o", out)  # not quiet: no plan may be printed
    one_line_error(proc, STORAGE, f"{out}: cannot write the answers file", shown)


def test_a_full_disk_on_the_output_is_one_line(replay_pool):
    cfg, qs = replay_pool
    one_line_error(coe("run", qs, "-c", cfg, "-q", "-o", "/dev/full"), STORAGE,
                   "/dev/full: cannot write the answers: No space left on device")


def test_a_disk_that_fills_while_answers_are_written_leaves_whole_lines(replay_pool, tmp_path):
    cfg, qs = replay_pool
    full = tmp_path / "full.jsonl"
    assert coe("run", qs, "-c", cfg, "-q", "-o", full).returncode == 0
    sizes = [len(line) for line in full.read_bytes().splitlines(keepends=True)]
    out = tmp_path / "answers.jsonl"
    # room for two answers and half of the third
    proc = coe("run", qs, "-c", cfg, "-q", "--no-cache", "-o", out,
               file_size=sizes[0] + sizes[1] + sizes[2] // 2)
    one_line_error(proc, STORAGE, f"{out}: cannot write the answers: File too large",
                   "2 written by this run", "rerun with --resume")
    assert [r["id"] for r in rows(out)] == ["r0", "r1"]  # whole lines only
    again = coe("run", qs, "-c", cfg, "-q", "-o", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "4 questions answered (2 already in" in again.stderr
    assert sorted(r["id"] for r in rows(out)) == [f"r{i}" for i in range(6)]


def test_a_cache_that_fills_mid_run_stops_the_run_in_one_line(tmp_path, plugin_dir):  # noqa: F811
    """Echo experts (cacheable, instant) fill a cache capped at 64 KiB: the run stops at the
    first generation that cannot be stored, says so in one line naming the cache (no expert
    is reported as crashed), and keeps what was stored; a rerun makes only the rest."""
    env = {"PYTHONPATH": f"{plugin_dir}{os.pathsep}{REPO}"}
    cache = tmp_path / "cache" / "responses.sqlite"
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({
        "experts": [{"name": f"e{i}", "backend": "echo", "model": "-", "letter": letter}
                    for i, letter in enumerate("ABC")],
        "router": {"kind": "all"}, "cache": str(cache)}))
    qs = write_jsonl(tmp_path / "q.jsonl", [
        {"id": f"q{i}", "question": f"Question {i}? " + "x" * 200, "choices": ["w", "x", "y"]}
        for i in range(40)])
    out = tmp_path / "answers.jsonl"
    proc = coe("run", qs, "-c", cfg, "-q", "-o", out, env=env, file_size=64 * 1024)
    one_line_error(proc, STORAGE, f"{cache}: cannot write the response cache",
                   "the generations stored before are kept")
    assert "crashed" not in proc.stderr and "failed" not in proc.stderr
    with sqlite3.connect(cache) as db:
        stored = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert 0 < stored < 120
    again = coe("run", qs, "-c", cfg, "-q", "-o", out, "--resume", env=env)
    assert again.returncode == 0, again.stderr
    assert f"generations: {120 - stored}, cached: {stored}, failed: 0" in again.stderr
    assert len(rows(out)) == 40


def test_other_files_that_cannot_be_written_are_one_line(replay_pool, tmp_path):
    """Files written at the end of other commands (profiles, a router, a report): one line
    naming the file, exit 5, not a traceback."""
    cfg, qs = replay_pool
    (tmp_path / "a-file").write_text("x")
    # found before any work, the validation record beside the profiles too
    one_line_error(coe("profile", qs, "-c", cfg, "-q", "-o", tmp_path / "a-file" / "p.json"),
                   STORAGE, f"{tmp_path / 'a-file' / 'p.json'}: cannot write the profiles: "
                   "Not a directory")


# -- defect 7: --resume and questions asked differently since -------------------------------

def test_resume_answers_again_the_questions_whose_text_or_choices_changed(replay_pool, tmp_path):
    cfg, qs = replay_pool
    out = tmp_path / "answers.jsonl"
    assert coe("run", qs, "-c", cfg, "-q", "-o", out).returncode == 0
    assert rows(out)[0]["choices"] == ["w", "x", "y", "z"]
    questions = rows(qs)
    questions[1]["question"] = "Question number one, reworded?"
    questions[2]["choices"] = ["w", "x", "y", "something else"]
    write_jsonl(qs, questions)
    again = coe("run", qs, "-c", cfg, "-q", "-o", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "2 questions answered (4 already in" in again.stderr
    by_id = {r["id"]: r for r in rows(out)}
    assert len(rows(out)) == 6 and len(by_id) == 6
    assert by_id["r1"]["question"] == "Question number one, reworded?"
    assert by_id["r2"]["choices"] == ["w", "x", "y", "something else"]


# -- question files that are not files --------------------------------------------------------

def test_a_question_path_that_is_not_a_file_says_what_it_is(replay_pool, tmp_path):
    cfg, _ = replay_pool
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    one_line_error(coe("run", tmp_path, "-c", cfg), 3, f"{tmp_path}: is a directory")
    one_line_error(coe("run", tmp_path / "loop1", "-c", cfg), 3, "loop1: symlink loop")
    one_line_error(coe("run", tmp_path / "none.jsonl", "-c", cfg), 3,
                   "none.jsonl: question file not found")
    sock_path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        one_line_error(coe("run", sock_path, "-c", cfg), 3, "s.sock: not a regular file")


def test_questions_from_standard_input_and_from_a_fifo(replay_pool, tmp_path):
    cfg, qs = replay_pool
    with open(qs, "rb") as stdin:
        proc = coe("run", "-", "-c", cfg, "-q", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["id"] for x in proc.stdout.splitlines()] == [f"r{i}" for i in range(6)]

    csv = tmp_path / "q.csv"  # a stream's format is found from its first character
    csv.write_text("id,question,A,B,answer\nr0,Question number 0?,w,x,A\n")
    with open(csv, "rb") as stdin:
        proc = coe("route", "-", "-c", cfg, stdin=stdin)
    assert proc.returncode == 0 and proc.stdout.startswith("r0\t"), proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine?"}\n{oops\n')
    with open(bad, "rb") as stdin:
        one_line_error(coe("route", "-", "-c", cfg, stdin=stdin), 3, "<stdin>:2: invalid JSON")

    fifo = tmp_path / "questions.fifo"  # <(zcat q.jsonl.gz) is one of these
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(qs.read_bytes()), daemon=True)
    writer.start()  # blocks until coe opens the FIFO for reading
    proc = coe("run", fifo, "-c", cfg, "-q", timeout=120)
    writer.join(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 6
