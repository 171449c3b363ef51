"""The evaluation report's plots (matplotlib, headless): accuracy per strategy with its 95%
interval, per category, how often each expert is recruited, and accuracy against cost and
active parameters."""

from __future__ import annotations

from pathlib import Path

from coe.apps.eval.result import EvalResult
from coe.apps.eval.scoring import StrategyScore


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _height(scores: list[StrategyScore]) -> float:
    return 0.35 * len(scores) + 1.5


def plot_accuracy(scores: list[StrategyScore], path: Path) -> Path:
    """Accuracy per strategy, with the 95% interval."""
    import numpy as np

    acc = np.array([100 * s.overall.value for s in scores])
    lo = np.array([100 * s.overall.ci[0] for s in scores])
    hi = np.array([100 * s.overall.ci[1] for s in scores])
    fig, ax = _pyplot().subplots(figsize=(8, _height(scores)))
    y = np.arange(len(scores))[::-1]
    colors = ["#999999" if s.name.startswith("single:") else
              "#d62728" if s.name == "oracle" else "#1f77b4" for s in scores]
    err = np.clip([acc - lo, hi - acc], 0, None)  # float noise at 0 % or 100 %
    ax.barh(y, acc, xerr=err, color=colors, capsize=3)
    ax.set_yticks(y, [s.name for s in scores])
    ax.set_xlabel("accuracy % (95% Wilson interval)")
    ax.set_title(f"Accuracy per strategy (n={scores[0].overall.n})")
    for yi, a, top in zip(y, acc, hi):
        ax.text(top + 0.7, yi, f"{a:.1f}", va="center", fontsize=8)
    return _save(fig, path)


def plot_categories(scores: list[StrategyScore], path: Path) -> Path | None:
    """Accuracy per category: a strategies x categories heat map."""
    import numpy as np

    cats = sorted({c for s in scores for c in s.per_category})
    if not cats:
        return None
    grid = np.array([[100 * s.per_category[c].value if c in s.per_category else np.nan
                      for c in cats] for s in scores])
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 3.0 + 0.75 * len(cats)), _height(scores)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_xticks(range(len(cats)), cats, rotation=45, ha="right")
    ax.set_yticks(range(len(scores)), [s.name for s in scores])
    if grid.size <= 600:
        for i, j in zip(*np.nonzero(~np.isnan(grid))):
            ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center",
                    fontsize=7, color="w" if grid[i, j] < 60 else "k")
    fig.colorbar(im, ax=ax, label="accuracy %")
    ax.set_title("Accuracy per category")
    return _save(fig, path)


def plot_usage(scores: list[StrategyScore], experts: list[str], path: Path) -> Path:
    """Expert usage: the fraction of questions each expert was recruited for (and aggregated)."""
    import numpy as np

    use = np.array([[s.usage.get(e, 0) / max(s.questions, 1) for e in experts] for s in scores])
    agg = np.array([[s.aggregator_usage.get(e, 0) / max(s.questions, 1) for e in experts]
                    for s in scores])
    fig, ax = _pyplot().subplots(figsize=(max(6.0, 3.0 + 0.7 * len(experts)), _height(scores)))
    im = ax.imshow(use, aspect="auto", cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right")
    ax.set_yticks(range(len(scores)), [s.name for s in scores])
    for i, j in np.ndindex(use.shape):
        label = f"{use[i, j]:.2f}" if use[i, j] else ""
        if agg[i, j]:
            label += f"\nagg {agg[i, j]:.2f}"
        if label:
            ax.text(j, i, label, ha="center", va="center", fontsize=6,
                    color="w" if use[i, j] > 0.6 else "k")
    fig.colorbar(im, ax=ax, label="fraction of questions recruited")
    ax.set_title("Expert usage")
    return _save(fig, path)


def _scatter(ax, scores: list[StrategyScore], attr: str, label: str) -> None:
    pts = [(getattr(s, attr), 100 * s.overall.value, s) for s in scores
           if getattr(s, attr) is not None]
    if attr == "avg_cost" and not any(p[0] for p in pts):
        ax.text(0.5, 0.5, "no cost: the yaml gives no prices\n(or no tokens were counted)",
                ha="center", va="center", transform=ax.transAxes)
        pts = []
    elif not pts:
        ax.text(0.5, 0.5, "no 'params' in the yaml", ha="center", va="center",
                transform=ax.transAxes)
    for x, a, s in pts:
        c = s.overall.ci
        ax.errorbar([x], [a], yerr=[[max(0.0, a - 100 * c[0])], [max(0.0, 100 * c[1] - a)]],
                    fmt="o", color="#999999" if s.name.startswith("single:") else "#1f77b4",
                    capsize=2)
        ax.annotate(s.name, (x, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy %")
    ax.grid(alpha=0.3)


def plot_cost(scores: list[StrategyScore], path: Path) -> Path:
    """Accuracy against average active parameters and against average cost per question."""
    fig, axes = _pyplot().subplots(1, 2, figsize=(13, 5.5))
    _scatter(axes[0], scores, "avg_active_params", "average active parameters (B)")
    _scatter(axes[1], scores, "avg_cost", "average cost per question ($)")
    axes[0].set_title("Accuracy vs active parameters")
    axes[1].set_title("Accuracy vs cost")
    return _save(fig, path)


def plot(result: EvalResult, out: Path) -> list[Path]:
    scores = [s for s in result.scores if s.overall.n]
    if not scores:
        return []
    files = [plot_accuracy(scores, out / "accuracy.png"),
             plot_categories(scores, out / "categories.png"),
             plot_usage(scores, [e.name for e in result.config.experts], out / "usage.png"),
             plot_cost(scores, out / "cost.png")]
    return [f for f in files if f is not None]
