"""Figures of an ablation grid: loss curves, a metric against rank, every seed as a dot.

Rows are the flat dicts of :mod:`qlora_helpers.ablations` (one per variant and seed); statistics
come from :mod:`qlora_helpers.seed_stats`.
"""
from __future__ import annotations

import statistics

import matplotlib.pyplot as plt

from .ablation_plan import BASELINE_NAME
from .seed_stats import summarize


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average.

    >>> smooth([1, 3, 5], 2)
    [1.0, 2.0, 4.0]
    """
    return [statistics.fmean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot_rank(rows: list[dict], key: str = "eval_loss"):
    """``key`` against r, LoRA's alpha/r versus rsLoRA's alpha/sqrt(r); mean ± std over seeds."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for rs, label in ((False, "alpha / r (LoRA)"), (True, "alpha / sqrt(r) (rsLoRA)")):
        pts = sorted({r["r"]: r["name"] for r in rows if r["use_rslora"] == rs
                      and r["name"].startswith("r")}.items())
        stats = summarize(rows, key)
        ax.errorbar([p[0] for p in pts], [stats[n][0] for _, n in pts],
                    yerr=[stats[n][1] for _, n in pts], marker="o", capsize=3, label=label)
    ax.set(xscale="log", xlabel="rank r", ylabel=key.replace("_", " "), title=f"{key.replace('_', ' ')} vs rank")
    ax.set_xticks(sorted({r["r"] for r in rows}), labels=sorted({r["r"] for r in rows}))
    ax.minorticks_off()  # log-axis minor labels (6x10^0 ...) would overprint the ranks
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], names: list[str] | None = None, window: int = 10):
    """Smoothed training-loss curves, one line per variant (seed 0 if several)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    done = set()
    for r in rows:
        if r["name"] in done or (names and r["name"] not in names):
            continue
        done.add(r["name"])
        ax.plot(range(1, len(r["losses"]) + 1), smooth(r["losses"], window), label=r["name"])
    ax.set(xlabel="step", ylabel=f"training loss ({window}-step mean)", yscale="log", title="loss curves")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_spread(rows: list[dict], key: str = "exact_match", reference: str = BASELINE_NAME):
    """Every seed as a dot, the mean as a bar, one row per variant: is a gap bigger than the spread?
    The ``reference`` variant's mean ± 2 std is shaded."""
    stats = summarize(rows, key)
    names = list(stats)
    fig, ax = plt.subplots(figsize=(6, 0.32 * len(names) + 1.2))
    if reference in stats:
        m, s, _ = stats[reference]
        ax.axvspan(m - 2 * s, m + 2 * s, color="C0", alpha=0.15, label=f"{reference} mean ± 2 std")
    for i, n in enumerate(names):
        vals = [float(r[key]) for r in rows if r["name"] == n]
        ax.plot(vals, [i] * len(vals), "o", color="C1", alpha=0.7, ms=4)
        ax.plot([stats[n][0]] * 2, [i - 0.3, i + 0.3], color="k", lw=2)
    ax.set_yticks(range(len(names)), labels=names)
    ax.invert_yaxis()
    ax.set(xlabel=key.replace("_", " "), title=f"{key.replace('_', ' ')}: each seed (dots), mean (bar)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
