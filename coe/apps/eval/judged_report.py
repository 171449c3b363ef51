"""The report of a judged evaluation (``coe.apps.eval.judged``): ``report.json``, ``report.md``,
``outcomes.jsonl`` and ``winrate_length.png`` (win rate against mean answer length).

``report.json`` keeps the layout of every evaluation report (``strategies[].name``, the
``best-single`` and ``oracle`` strategies, ``comparison.{validation,test}``,
``recommendation.strategy``) and adds, per strategy, ``win_rate`` and ``lc_win_rate``
(percent, with 95% bootstrap intervals), ``mean_chars`` and ``answers_per_instruction``.
"""

from __future__ import annotations

import json
from pathlib import Path

from coe.apps.eval.compare import RESAMPLES
from coe.apps.eval.judged import JudgedEvaluation
from coe.apps.eval.plots import _pyplot, _save

METHOD = (f"per-instruction scores (judged p_win; for LC the length-adjusted p - mu(delta) + "
          f"mu(0) of the strategy's own GLM, held fixed): paired bootstrap ({RESAMPLES} "
          "resamples, percentile 95% interval), paired t-test, Holm's correction across the "
          "strategies of a half, significant below 0.05")
FILES = ("report.md", "report.json", "outcomes.jsonl", "winrate_length.png")


def _ci(lo_hi) -> str:
    return f"[{lo_hi[0]:.1f}, {lo_hi[1]:.1f}]"


def table(ev: JudgedEvaluation, where: str = "test") -> str:
    """The strategies on one half: WR, LC WR, intervals, answers/instruction, mean chars and
    the LC comparison with best-single."""
    rows = ["| strategy | WR % | 95% CI | LC WR % | 95% CI | answers/instr | mean chars | "
            "LC vs best-single | Holm p |", "|---|---:|---|---:|---|---:|---:|---:|---|"]
    comps = ev.comparisons.get(where, {})
    for s in ev.strategies:
        sc = s.scores[where]
        c = comps.get(s.name)
        vs = f"{100 * c.diff:+.1f}" if c is not None and c.diff is not None else ""
        p = "" if c is None or c.p_holm is None else f"{c.p_holm:.2g}" + (
            f" ({c.verdict})" if c.verdict else "")
        rows.append(f"| {s.name} | {sc.fit.win_rate:.1f} | {_ci(sc.ci)} | {sc.fit.lc_win_rate:.1f} "
                    f"| {_ci(sc.lc_ci)} | {sc.consulted:g} | {sc.chars.mean():.0f} | {vs} | {p} |")
    return "\n".join(rows)


def to_json(ev: JudgedEvaluation, source: str | None = None) -> dict:
    test = ev.data.test
    rec = ev.recommendation
    return {
        "kind": "pairwise-judged", "questions": len(test.questions), "config": source,
        "seed": ev.seed, "ci_method": "bootstrap percentile, 95% (2000 resamples)",
        "consensus_threshold": ev.threshold,
        "validation": {"source": "the pool's training half", "questions": len(ev.data.train.questions),
                       "best_single": ev.best,
                       "strategies": [{"name": s.name, **s.scores["validation"].to_json()}
                                      for s in ev.strategies]},
        "comparison": {"reference": "best-single", "metric": "lc_win_rate", "method": METHOD,
                       **{w: {n: c.to_json() for n, c in comps.items()}
                          for w, comps in ev.comparisons.items()},
                       "raw_win_rate": {w: {n: c.to_json() for n, c in comps.items()}
                                        for w, comps in ev.raw_comparisons.items()}},
        "recommendation": rec.to_json() if rec else {"none": "no strategy"},
        "strategies": [{"name": s.name, "kind": s.kind, "description": s.description,
                        **s.scores["test"].to_json()} for s in ev.strategies],
        "notes": ev.notes,
        **({"judge": ev.judge} if ev.judge is not None else {}),
    }


def markdown(ev: JudgedEvaluation, source: str | None = None) -> str:
    rec = ev.recommendation
    parts = ["# Evaluation report (pairwise-judged pool)", "", f"Pool: `{source}`", "",
             f"- {len(ev.data.test.questions)} test instructions; everything chosen on the "
             f"{len(ev.data.train.questions)} training instructions (best-single: {ev.best}; "
             f"consensus threshold {ev.threshold:g}; the selectors)",
             "- WR: mean judged p_win of the picked answers (x100); LC WR: length-controlled "
             "win rate (logistic GLM on the length difference to the reference and the "
             "instruction's difficulty, read at zero difference: arXiv 2404.04475)", ""]
    if rec is not None:
        c = ev.comparisons["test"].get(rec.strategy)
        parts += ["## Recommendation", "", f"**{rec.strategy}**: {rec.reason}."]
        if c is not None and c.diff is not None:
            parts.append(f"- test (a check, not used to choose): LC {100 * c.diff:+.1f} points "
                         f"vs best-single, [{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}], Holm p "
                         f"{c.p_holm:.2g}" + (f": significantly {c.verdict}" if c.verdict else ""))
        parts += [f"- not recommendable: {n}, {why}" for n, why in rec.not_recommendable.items()]
        parts.append("")
    parts += ["## Strategies (test half)", "", table(ev, "test"), "",
              "## Strategies (training half: where everything is chosen)", "",
              table(ev, "validation"), "", f"Comparisons: {METHOD}.", ""]
    parts += [f"- **{s.name}**: {s.description}" for s in ev.strategies]
    if ev.judge is not None:
        parts += ["", f"## Judged by {ev.judge['expert']} (`--judge`)", "",
                  f"- trust, on {ev.judge['sample']} recorded answers of the training half: "
                  f"{ev.judge['trust']['sentence']}"]
        f = ev.judge.get("fuse")
        if f:
            name = f["strategy"]
            parts.append(f"- {name} (written by {f['aggregator']}) vs best-single on "
                         f"{f['instructions']} test instructions, both judged by "
                         f"{ev.judge['expert']}: win rate {f[name]['win_rate']} vs "
                         f"{f['best-single']['win_rate']}, mean chars "
                         f"{f[name]['mean_chars']:.0f} vs {f['best-single']['mean_chars']:.0f}")
    return "\n".join(parts) + "\n"


def _points(ax, strategies, label_all: bool) -> None:
    for s in strategies:
        sc = s.scores["test"]
        x = float(sc.chars.mean())
        ax.plot([x, x], [sc.fit.lc_win_rate, sc.fit.win_rate], color="#cccccc", lw=1)
        ax.scatter(x, sc.fit.win_rate, color="#1f77b4", s=18)
        ax.scatter(x, sc.fit.lc_win_rate, color="#d62728", s=18, marker="s")
        if label_all:
            ax.annotate(s.name.replace("single:", ""), (x, sc.fit.win_rate), fontsize=6,
                        xytext=(3, 2), textcoords="offset points")


def plot_winrate_length(ev: JudgedEvaluation, path: Path) -> Path:
    """WR and LC WR against mean answer length, one point per strategy (test half): every
    strategy, and the ones within 10 points of best-single's LC, labelled."""
    fig, (whole, top) = _pyplot().subplots(1, 2, figsize=(14, 6))
    _points(whole, ev.strategies, label_all=False)
    ref = ev.strategy("best-single").scores["test"].fit.lc_win_rate
    near = [s for s in ev.strategies if s.name != "oracle"
            and max(s.scores["test"].fit.lc_win_rate, s.scores["test"].fit.win_rate) >= ref - 10]
    _points(top, near, label_all=True)
    whole.scatter([], [], color="#1f77b4", s=18, label="win rate")
    whole.scatter([], [], color="#d62728", s=18, marker="s", label="LC win rate")
    whole.legend()
    for ax, title in ((whole, "every strategy"), (top, "within 10 points of best-single's LC")):
        ax.set_xlabel("mean answer length (characters)")
        ax.set_ylabel("% (test half)")
        ax.set_title(f"Win rate against answer length: {title}")
    return _save(fig, path)


def write_outcomes(ev: JudgedEvaluation, path: Path) -> None:
    test = ev.data.test
    with open(path, "w", encoding="utf-8") as f:
        for i, q in enumerate(test.questions):
            row = {"id": q.id, "strategies": {
                s.name: {"expert": ev.names[int(s.scores["test"].picks[i])],
                         "p_win": round(float(test.p[i, s.scores["test"].picks[i]]), 6)}
                for s in ev.strategies}}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_judged_report(ev: JudgedEvaluation, out_dir: str | Path, source: str | None = None,
                        plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "report.md", out / "report.json", out / "outcomes.jsonl"]
    files[0].write_text(markdown(ev, source), encoding="utf-8")
    files[1].write_text(json.dumps(to_json(ev, source), indent=1, ensure_ascii=False),
                        encoding="utf-8")
    write_outcomes(ev, files[2])
    if plots:
        files.append(plot_winrate_length(ev, out / "winrate_length.png"))
    return files
