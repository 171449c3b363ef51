"""``coe pool`` and ``coe eval`` on a pairwise-judged folder (the AlpacaEval layout): a small
synthetic one, built here, and (slow) the shared recorded data when it is beside the repo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from coe.apps.eval.job import run_judged_eval
from coe.apps.eval.judged_pool import THRESHOLDS
from coe.apps.eval.pools import build_pool, split_ids
from coe.apps.eval.recorded import PoolSourceError
from coe.core.config import load_config

#: the shared data beside the repo (or beside a folder above it: a git worktree)
SHARED = next((up / "shared" / "data" / "alpaca-eval" for up in Path(__file__).resolve().parents[3:]
               if (up / "shared" / "data" / "alpaca-eval").is_dir()), Path("/nonexistent"))
TOPICS = ["a poem about the sea", "sorting a list in python", "the french revolution",
          "a recipe for bread", "how vaccines work", "a cover letter", "prime numbers",
          "the rules of chess"]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def judged_folder(root: Path, n: int = 48, flip_test: bool = False) -> Path:
    """Three models: ``good`` wins most instructions at the reference's length, ``long`` wins
    by writing three times as much, ``weak`` rarely wins. With ``flip_test`` the judgements of
    the test half (``split_ids``, seed 0) are reversed: ``weak`` wins there."""
    ids = [f"q{i:03d}" for i in range(n)]
    _, test = split_ids(ids, 0)
    rng = np.random.default_rng(0)
    _write(root / "questions.jsonl", [{"id": i, "instruction": f"Write about {TOPICS[k % 8]} "
                                       f"(variant {k})", "dataset": "synthetic"}
                                      for k, i in enumerate(ids)])
    _write(root / "reference.jsonl", [{"id": i, "output": "r" * 400} for i in ids])
    base = {"good": 0.8, "long": 0.55, "weak": 0.1}
    length = {"good": 420, "long": 1300, "weak": 300}
    for m in base:
        outs, judged = [], []
        for k, i in enumerate(ids):
            text = f"{m} answers about {TOPICS[k % 8]}. " + "x" * (length[m] + k)
            p = float(np.clip(base[m] + rng.normal(0, 0.1), 0, 1))
            if flip_test and i in test:
                p = 1.0 - p
            outs.append({"id": i, "output": text})
            judged.append({"id": i, "preference": 1 + p, "p_win": p, "output_chars": len(text)})
        _write(root / "outputs" / f"{m}.jsonl", outs)
        _write(root / "judgements" / f"{m}.jsonl", judged)
    return root


def test_coe_pool_detects_a_judged_folder_and_writes_the_pool_layout(tmp_path):
    src = judged_folder(tmp_path / "src")
    summary = build_pool(src, tmp_path / "pool")
    pool = tmp_path / "pool"
    assert summary["format"] == "judged" and (summary["train"], summary["test"]) == (24, 24)
    train = [json.loads(line) for line in open(pool / "train.jsonl")]
    assert [q["id"] for q in train] == split_ids([f"q{i:03d}" for i in range(48)], 0)[0]
    assert all(q["kind"] == "free" and q["answer"] == "r" * 400 for q in train)  # reference
    rec = json.loads(open(pool / "replay" / "long.jsonl").readline())
    assert {"id", "text", "p_win", "chars", "ref_chars"} <= rec.keys()
    assert rec["chars"] == len(rec["text"]) and rec["ref_chars"] == 400
    y = yaml.safe_load(open(pool / "experts.yaml"))
    strength = {e["name"]: e["strength"] for e in y["experts"]}
    assert max(strength, key=strength.get) == "good" and strength["weak"] < 0.3
    assert y["router"]["kind"] == "knn" and (pool / "profiles.json").is_file()
    assert y["aggregator"]["threshold"] in THRESHOLDS
    load_config(pool / "experts.yaml")  # a valid pool


@pytest.mark.parametrize("bad, message", [
    ({"p_win": 1.5}, ":3: field 'p_win'"),
    ({"output_chars": 7}, ":3: output_chars 7 but the output has"),
])
def test_a_bad_judgement_is_one_error_naming_file_and_line(tmp_path, bad, message):
    src = judged_folder(tmp_path / "src")
    path = src / "judgements" / "weak.jsonl"
    rows = [json.loads(line) for line in open(path)]
    rows[2].update(bad)
    _write(path, rows)
    with pytest.raises(PoolSourceError, match=message) as e:
        build_pool(src, tmp_path / "pool")
    assert "weak.jsonl" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "pool" / "experts.yaml").exists()


def test_a_model_judged_on_other_instructions_is_an_error(tmp_path):
    src = judged_folder(tmp_path / "src")
    path = src / "judgements" / "good.jsonl"
    _write(path, [json.loads(line) for line in open(path)][:-1])
    with pytest.raises(PoolSourceError, match="1 missing"):
        build_pool(src, tmp_path / "pool")


def _evaluate(tmp_path, flip_test=False):
    src = judged_folder(tmp_path / "src", flip_test=flip_test)
    build_pool(src, tmp_path / "pool")
    cfg = load_config(tmp_path / "pool" / "experts.yaml")
    ev, files = run_judged_eval(tmp_path / "pool" / "test.jsonl", cfg, validation=None,
                                out_dir=tmp_path / "eval", plots=False)
    return ev, json.loads((tmp_path / "eval" / "report.json").read_text())


def test_coe_eval_on_a_judged_pool_reports_win_rate_and_lc_win_rate_per_strategy(tmp_path):
    ev, report = _evaluate(tmp_path)
    by = {s["name"]: s for s in report["strategies"]}
    assert {"best-single", "oracle", "longest", "all+vote", "knn@1", "knn3+selector",
            "all+selector-lc", "random3+vote", "single:good"} <= by.keys()
    assert report["validation"]["best_single"] == "good"
    for s in by.values():
        assert {"win_rate", "lc_win_rate", "mean_chars", "win_rate_ci95",
                "answers_per_instruction"} <= s.keys()
        assert s["win_rate_ci95"][0] <= s["win_rate"] <= s["win_rate_ci95"][1]
        assert s["win_rate"] <= by["oracle"]["win_rate"] + 1e-9
    assert by["longest"]["mean_chars"] > by["best-single"]["mean_chars"]
    # the long answers win by length: raw and LC disagree about them, not about the good ones
    long_ = by["single:long"]
    assert long_["win_rate"] - long_["lc_win_rate"] > by["single:good"]["win_rate"] - \
        by["single:good"]["lc_win_rate"]
    assert by["knn3+vote"]["answers_per_instruction"] == 3
    assert report["recommendation"]["strategy"] in by
    assert "test" in report["comparison"] and "validation" in report["comparison"]
    assert "| best-single |" in (tmp_path / "eval" / "report.md").read_text()


def test_every_choice_is_made_on_the_training_half(tmp_path):
    """Reversing the test half's judgements changes the test figures, not what was chosen."""
    ev, report = _evaluate(tmp_path / "a")
    ev2, flipped = _evaluate(tmp_path / "b", flip_test=True)
    assert flipped["validation"]["best_single"] == report["validation"]["best_single"] == "good"
    assert flipped["recommendation"]["strategy"] == report["recommendation"]["strategy"]
    assert flipped["validation"]["strategies"] == report["validation"]["strategies"]
    by = {s["name"]: s for s in flipped["strategies"]}
    assert by["best-single"]["win_rate"] < 30 < by["single:weak"]["win_rate"]


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/alpaca-eval not beside the repo")
def test_the_shared_alpaca_pool_matches_the_leaderboard(tmp_path):
    summary = build_pool(SHARED, tmp_path / "pool")
    assert summary["questions"] == 805 and summary["format"] == "judged"
    cfg = load_config(tmp_path / "pool" / "experts.yaml")
    ev, _ = run_judged_eval(tmp_path / "pool" / "test.jsonl", cfg, validation=None,
                            out_dir=tmp_path / "eval", plots=False)
    assert ev.best == "FuseChat-Gemma-2-9B-Instruct"
    oracle = ev.strategy("oracle").scores["test"].fit.win_rate
    assert all(s.scores["test"].fit.win_rate <= oracle for s in ev.strategies)


def test_the_coe_pool_and_coe_eval_commands_take_a_judged_folder(tmp_path):
    from typer.testing import CliRunner

    from coe.apps.cli import app

    src = judged_folder(tmp_path / "src")
    pool, out = tmp_path / "pool", tmp_path / "eval"
    runner = CliRunner()
    made = runner.invoke(app, ["pool", str(src), "-o", str(pool), "-q"])
    assert made.exit_code == 0, made.output
    assert "train WR" in made.output
    done = runner.invoke(app, ["eval", str(pool / "test.jsonl"), "-c", str(pool / "experts.yaml"),
                               "-o", str(out), "--no-plots", "-q"])
    assert done.exit_code == 0, done.output
    assert "| best-single |" in done.output and "LC WR %" in done.output
    assert json.loads((out / "report.json").read_text())["kind"] == "pairwise-judged"


def test_strategies_pick_what_a_judged_evaluation_reports_with_best_single_kept(tmp_path):
    src = judged_folder(tmp_path / "src")
    build_pool(src, tmp_path / "pool")
    cfg = load_config(tmp_path / "pool" / "experts.yaml")
    ev, _ = run_judged_eval(tmp_path / "pool" / "test.jsonl", cfg, validation=None,
                            out_dir=tmp_path / "eval", plots=False, strategies="knn*,oracle")
    names = [s.name for s in ev.strategies]
    assert "best-single" in names and "oracle" in names and "longest" not in names
    assert all(n in ("best-single", "oracle") or n.startswith("knn") for n in names)
    assert set(ev.comparisons["test"]) == set(names) - {"best-single"}
