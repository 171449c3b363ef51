"""The report of an evaluation job: a markdown table, a JSON file and matplotlib plots.

- ``report.md``: the recommendation (which strategy to deploy, chosen on the validation
  questions, why, and its validation and test figures), the paired comparison of every
  strategy with best-single on the validation and the test questions, the strategy table
  (accuracy with its 95% Wilson interval, active parameters, tokens, cost, generation time,
  the recruit oracle, questions whose answer rests on a truncated generation), then accuracy
  per category;
- ``report.json``: the same figures and the job's generation counts, machine-readable, with
  ``truncated``: the expert generations cut off (finish_reason length) per expert and why;
- ``outcomes.jsonl``: per test question, each strategy's answer and whether it was right;
- ``recommended.yaml``: the evaluated pool set to run the recommended strategy (``coe run -c``);
- ``accuracy.png``, ``categories.png``, ``usage.png``, ``cost.png``: accuracy per strategy,
  accuracy per category, expert usage, and accuracy against average active parameters and
  average cost per question.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from coe.apps.eval.compare import METHOD as COMPARISON_METHOD
from coe.apps.eval.compare import Comparison
from coe.apps.eval.plots import plot
from coe.apps.eval.recommend import generations_per_question
from coe.apps.eval.result import EvalResult
from coe.apps.eval.scoring import NO_CATEGORY, StrategyScore
from coe.core.types import ExpertResponse
from coe.core.wording import counted
from coe.pipeline.responses import ResponseTable
from coe.pipeline.results import truncation_warning
from coe.text.answers import describe_ungraded

CI_METHOD = "Wilson score interval, 95%"
# Truncated answers (cut off by max_tokens or the context window) are graded as they are, like
# any other: leaving them out would score each strategy on a different, easier subset. They
# are counted instead, per strategy and per expert, and a warning names them.
TRUNCATION_POLICY = "truncated answers are graded as given"


def truncated_questions(result: EvalResult, strategy: str) -> int:
    """Questions whose answer of ``strategy`` rests on a truncated generation."""
    outcomes = result.outcomes.get(strategy)
    return 0 if outcomes is None else int(outcomes.truncated.sum())


def _cut_generations(result: EvalResult) -> list[tuple[str, ExpertResponse]]:
    """(question id, response) of every truncated test-set generation: the experts' (one per
    question and expert, shared by the strategies), then each distinct llm aggregator one."""
    t: ResponseTable = result.responses
    ids = [q.id for q in result.questions]
    out = [(ids[i], t.response(i, j)) for i, j in zip(*np.nonzero(t.truncated & t.has))]
    seen = set()
    for outs in result.outcomes.values():
        for qid, a in zip(ids, outs.aggregator or ()):
            if a is not None and a.truncated and (qid, a.expert, a.text) not in seen:
                seen.add((qid, a.expert, a.text))
                out.append((qid, a))
    return out


def truncation_json(result: EvalResult) -> dict:
    by_expert: dict[str, dict] = {}
    cut = _cut_generations(result)
    for qid, r in cut:
        e = by_expert.setdefault(r.expert, {"responses": 0, "context": 0, "max_tokens": 0,
                                            "unknown": 0, "questions": []})
        e["responses"] += 1
        e[r.truncated_by or "unknown"] += 1
        e["questions"].append(qid)
    return {"responses": len(cut), "by_expert": by_expert, "policy": TRUNCATION_POLICY}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _ci(s: StrategyScore) -> str:
    ci = s.overall.ci
    return "-" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _generations(s: StrategyScore | None) -> str:
    """Generations per question: the mean and, in brackets, the most one question took."""
    if s is None:
        return "-"
    return f"{generations_per_question(s):.2f} ({s.max_generations})"


def strategy_table(result: EvalResult) -> str:
    head = ("| strategy | accuracy % | 95% CI | n | failed | experts/q | generations/q (max) | "
            "active params/q (B) | tokens/q | cost/q ($) | gen s | recruit oracle % | "
            "truncated |")
    rows = [head, "|" + "---|" * 13]
    for s in result.scores:
        rows.append(
            f"| {s.name} | {_pct(s.overall.value)} | {_ci(s)} | {s.overall.n} | "
            f"{s.failed_questions} | "
            f"{s.avg_experts:.2f} | {_generations(s)} | {_num(s.avg_active_params, '.2f')} | "
            f"{s.avg_tokens:.0f} | {s.avg_cost:.6f} | {s.gen_seconds + s.route_seconds:.1f} | "
            f"{_pct(s.recruit_oracle.value)} | {truncated_questions(result, s.name)} |")
    return "\n".join(rows)


def _delta(c: Comparison | None) -> str:
    if c is None or c.diff is None:
        return "-"
    return f"{100 * c.diff:+.1f} [{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}]"


def _p(c: Comparison | None) -> str:
    if c is None or c.p_holm is None:
        return "-"
    return "<0.001" if c.p_holm < 0.001 else f"{c.p_holm:.3f}"


def _verdicts(result: EvalResult, name: str) -> str:
    """Where the strategy is significantly better or worse than best-single (after Holm)."""
    out = []
    for where in ("validation", "test"):
        c = result.comparisons.get(where, {}).get(name)
        if c is not None and c.verdict:
            out.append(f"**worse on {where}**" if c.verdict == "worse" else f"better on {where}")
    return "; ".join(out)


def comparison_table(result: EvalResult) -> str:
    """Per strategy: generations per question, accuracy and the paired difference with
    best-single (95% bootstrap interval, Holm-corrected McNemar p) on the validation and the
    test questions, and where it is significantly better or worse."""
    if not result.comparisons:
        return ""
    ref = next(s.name for s in result.specs if s.kind == "best-single")
    val = {s.name: s for s in result.val_scores}
    rec = result.recommendation.strategy if result.recommendation else None
    head = ("| strategy | generations/q (max) | validation acc % | Δ validation [95% CI] | p (Holm) | "
            "test acc % | Δ test [95% CI] | p (Holm) | vs best-single |")
    rows = [head, "|" + "---|" * 9]
    for s in result.scores:
        v = val.get(s.name)
        cv = result.comparisons["validation"].get(s.name)
        ct = result.comparisons["test"].get(s.name)
        mark = (" (recommended)" if s.name == rec else "") + \
            (" †" if s.name in result.in_sample else "")
        verdict = "reference" if s.name == ref else _verdicts(result, s.name)
        rows.append(
            f"| {s.name}{mark} | {_generations(v)} | "
            f"{_pct(v.overall.value if v else None)} | {_delta(cv)} | {_p(cv)} | "
            f"{_pct(s.overall.value)} | {_delta(ct)} | {_p(ct)} | {verdict} |")
    return "\n".join(rows)


def comparison_notes(result: EvalResult) -> list[str]:
    """What the comparison table's columns mean, and what it leaves out."""
    if not result.comparisons:
        return []
    out = [f"Δ: accuracy of the strategy minus best-single's, in points, on the questions both "
           f"are graded on; {COMPARISON_METHOD}. The intervals are not corrected for the "
           "number of strategies; the verdicts are. *generations/q*: expert and aggregator "
           "generations per validation question."]
    for where, comps in result.comparisons.items():
        left = {n: c.left_out for n, c in comps.items() if c.left_out}
        if left:
            out.append(f"Left out of the pairs on {where} (questions either one cannot be "
                       "graded on: no gradable gold answer, or a generation it needed failed): "
                       + ", ".join(f"{n} {k}" for n, k in left.items()) + ".")
        else:
            n = next((c.n for c in comps.values()), 0)
            out.append(f"On {where}, every pair is over the same {n} graded questions.")
    for name, why in result.in_sample.items():
        out.append(f"† {name}: {why}.")
    if "validation" in result.strength_source.values():
        out.append("Vote ties are broken by expert strengths measured on the validation "
                   "questions (experts without a yaml strength): the vote strategies' "
                   "validation figures lean on them slightly.")
    return out


def recommendation_lines(result: EvalResult) -> list[str]:
    """The recommendation, why, and its validation and test figures (markdown lines)."""
    rec = result.recommendation
    if rec is None:
        return [result.no_recommendation] if result.no_recommendation else []
    ref = next(s.name for s in result.specs if s.kind == "best-single")
    v = next(s for s in result.val_scores if s.name == rec.strategy)
    t = result.score(rec.strategy)

    def figures(score, where: str) -> str:
        line = (f"{_pct(score.overall.value)}% on {counted(score.overall.n, where + ' question')} "
                f"(95% CI {_ci(score)})")
        c = result.comparisons[where].get(rec.strategy)
        if c is not None:
            line += (f"; vs best-single {_delta(c)} points, McNemar p (Holm) {_p(c)}"
                     + (f": significantly {c.verdict}" if c.verdict else ": not significant"))
        return line

    out = [f"**{rec.strategy}**" + (f" (best-single is {result.best_single})"
                                     if rec.strategy == ref else "") + f": {rec.reason}.",
           "", f"- validation (chosen here): {figures(v, 'validation')}",
           f"- test (a check, not used to choose): {figures(t, 'test')}",
           f"- cost: {rec.generations:.2f} generations per question",
           "- `recommended.yaml` in this folder runs it: `coe run QUESTIONS -c "
           "recommended.yaml` (file paths in it are absolute)"]
    for name, why in rec.not_recommendable.items():
        out.append(f"- not recommendable: {name}, {why}")
    return out


def category_table(result: EvalResult) -> str:
    cats = sorted({c for s in result.scores for c in s.per_category})
    if not cats or cats == [NO_CATEGORY]:
        return ""
    head = "| strategy | " + " | ".join(cats) + " |"
    rows = [head, "|" + "---|" * (len(cats) + 1)]
    for s in result.scores:
        cells = [_pct(s.per_category[c].value) if c in s.per_category else "-" for c in cats]
        rows.append(f"| {s.name} | " + " | ".join(cells) + " |")
    n = [str(result.scores[0].per_category[c].n) if c in result.scores[0].per_category else "-"
         for c in cats]
    rows.append("| *n* | " + " | ".join(n) + " |")
    return "\n".join(rows)


def summary_lines(result: EvalResult) -> list[str]:
    out = [f"{counted(len(result.questions), 'test question')}, "
           f"{counted(len(result.scores), 'strategy', 'strategies')}, "
           f"{result.wall_seconds:.1f}s wall; accuracy CI: {CI_METHOD}",
           result.counts_line()]
    for p in result.phases:
        out.append(f"  {p.name}: {p.requests} requests, {p.unique} unique, {p.cached} cached, "
                   f"{p.generations} generated ({p.replayed} replayed), {p.failed} failed, "
                   f"{p.loads} loads, {p.seconds:.1f}s")
    if result.best_single:
        out.append(f"best single on validation ({result.validation_source}, "
                   f"n={len(result.validation)}): {result.best_single}")
    rec = result.recommendation
    if rec is not None:
        out.append(f"recommended (chosen on validation): {rec.strategy}: {rec.reason}")
    elif result.no_recommendation:
        out.append(result.no_recommendation)
    if result.ungraded:
        out.append(f"{len(result.ungraded)} of {len(result.questions)} test questions could not "
                   f"be graded ({describe_ungraded(result.ungraded)}): accuracy is over the "
                   f"other {result.graded_questions}")
    hit = sum(1 for s in result.scores if s.failed_questions)
    if hit:
        out.append(f"{counted(result.stats.failed_generations, 'generation')} failed (experts: "
                   f"{', '.join(sorted(result.stats.failures))}); the questions they touched are "
                   f"left out of the accuracy of {counted(hit, 'strategy', 'strategies')} "
                   f"(column failed); with the "
                   "response cache a rerun makes only the missing generations")
    src = set(result.strength_source.values())
    if src:
        out.append("vote ties broken by expert strength from " + " and ".join(sorted(src)))
    for name, why in result.skipped.items():
        out.append(f"skipped {name}: {why}")
    out += result.notes
    cut = truncation_warning(_cut_generations(result))
    if cut:
        out.append(cut)
    return out


def to_json(result: EvalResult) -> dict:
    return {
        "questions": len(result.questions),
        "config": result.config.source,
        "ci_method": CI_METHOD,
        "wall_seconds": round(result.wall_seconds, 3),
        "seed": result.seed,
        "generations": result.stats.generations,
        "replayed": result.replayed,
        "cache_hits": result.stats.cache_hits,
        "failed_generations": result.stats.failed_generations,
        "model_loads": result.stats.loads,
        "naive_loads": result.stats.naive_loads,
        "load_seconds": round(result.stats.load_seconds, 3),
        "phases": [p.to_json() for p in result.phases],
        "graded_questions": result.graded_questions,
        "ungraded": result.ungraded,
        "validation": {
            "source": result.validation_source, "questions": len(result.validation),
            "overlap": result.validation_overlap,
            "accuracy": {n: a.to_json() for n, a in result.validation_accuracy.items()},
            "failed": result.validation_failed,
            "best_single": result.best_single,
            "strategies": [s.to_json() for s in result.val_scores],
        },
        "comparison": {
            "reference": "best-single", "method": COMPARISON_METHOD,
            **{where: {n: c.to_json() for n, c in comps.items()}
               for where, comps in result.comparisons.items()},
            "in_sample": result.in_sample,
        },
        "recommendation": (result.recommendation.to_json() if result.recommendation
                           else {"none": result.no_recommendation}),
        "strength": result.strength, "strength_source": result.strength_source,
        "strategies": [{**s.to_json(), "truncated_questions": truncated_questions(result, s.name)}
                       for s in result.scores],
        "truncated": truncation_json(result),
        "skipped": result.skipped,
        "notes": result.notes,
        "failures": result.stats.failures,
    }


def markdown(result: EvalResult) -> str:
    parts = ["# Evaluation report", "", f"Pool: `{result.config.source}`", ""]
    parts += [f"- {line.strip()}" for line in summary_lines(result)]
    rec = recommendation_lines(result)
    if rec:
        parts += ["", "## Recommendation", "", *rec]
    table = comparison_table(result)
    if table:
        parts += ["", "## Paired comparison with best-single", "", table, ""]
        parts += [f"- {line}" for line in comparison_notes(result)]
    parts += ["", "## Strategies (test questions)", "", strategy_table(result), ""]
    parts += ["*n*: questions graded; *failed*: questions on which a generation the strategy "
              "needed failed, left out of its accuracy; "
              "*experts/q*: experts recruited per question; *active params/q*: parameters "
              "(billions) of the distinct experts whose generations the strategy used, plus the "
              "llm aggregator's pass; *gen s*: routing plus generation seconds of those "
              "generations (recorded time for cached or replayed ones); *recruit oracle*: "
              "right if any recruited expert is right; *truncated*: questions whose answer "
              "rests on a generation cut off by max_tokens or the context window (finish_reason "
              f"length): {TRUNCATION_POLICY}, counted here.", ""]
    for s in result.scores:
        parts.append(f"- **{s.name}**: {s.description}")
    cat = category_table(result)
    if cat:
        parts += ["", "## Accuracy per category (%)", "", cat]
    return "\n".join(parts) + "\n"


def write_outcomes(result: EvalResult, path: Path) -> None:
    """One line per test question, each strategy's answer on it, written as it is made from
    the outcome tables. (Row by row: holding a block of rows alive would make the garbage
    collector walk every question again and again, three times slower at 100,000.)"""
    names = [e.name for e in result.config.experts]
    columns = []
    for name, t in result.outcomes.items():
        value = t.answers.value
        columns.append((name, [value(a) for a in t.answer.tolist()],
                        [None if c < 0 else bool(c) for c in t.correct.tolist()],
                        t.failed.tolist(), t.routes, t.truncated.tolist()))
    encode = json.JSONEncoder(ensure_ascii=False).encode
    with open(path, "w", encoding="utf-8") as f:
        for i, q in enumerate(result.questions):
            row = {"id": q.id, "category": q.category, "strategies": {
                name: {"answer": answer[i], "correct": correct[i], "failed": failed[i],
                       "experts": [names[j] for j in routes.recruited(i)], "truncated": cut[i]}
                for name, answer, correct, failed, routes, cut in columns}}
            f.write(encode(row) + "\n")


def write_report(result: EvalResult, out_dir: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.json", out / "outcomes.jsonl"]
    files[0].write_text(markdown(result), encoding="utf-8")
    files[1].write_text(json.dumps(to_json(result), indent=1, ensure_ascii=False),
                        encoding="utf-8")
    write_outcomes(result, files[2])
    if result.recommended_pool is not None:
        files.append(out / "recommended.yaml")
        rec = result.recommendation
        head = (f"# coe eval: the recommended strategy, {rec.strategy} (chosen on the "
                f"validation questions; see report.md)\n")
        files[-1].write_text(head + yaml.safe_dump(result.recommended_pool, sort_keys=False,
                                                   allow_unicode=True), encoding="utf-8")
    if plots:
        files += plot(result, out)
    return files
