"""Reading results over seeds: mean ± std per variant, the kit's 2-std rule, one table.

What it teaches (notebook ``06_ablations``): one run per variant ranks noise. Each variant is
trained on several seeds; :func:`summarize` gives mean, sample std and the number of seeds, and
:func:`separated` calls a difference real only when the gap between two means is larger than
twice the larger of their stds (with fewer than two seeds each it refuses to judge). The rows are
the flat dicts :mod:`qlora_helpers.ablations` writes, one per (variant, seed).
"""
from __future__ import annotations

import statistics


def summarize(rows: list[dict], key: str) -> dict[str, tuple[float, float, int]]:
    """Per variant name: (mean, sample std (0 for one seed), number of seeds) of ``rows[key]``."""
    by: dict[str, list[float]] = {}
    for r in rows:
        by.setdefault(r["name"], []).append(float(r[key]))
    return {n: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
            for n, v in by.items()}


def results_table(rows: list[dict]) -> str:
    """One line per variant: mean ± std over seeds of EM and losses, params, memory, time (and the
    GPU allocator's peak when the rows were trained on a GPU)."""
    gpu = any(r.get("peak_gpu_bytes") for r in rows)
    keys = ["exact_match", "final_loss", "eval_loss", "trainable", "state_bytes", "activation_bytes", "seconds"]
    cols = {k: summarize(rows, k) for k in keys + (["peak_gpu_bytes"] if gpu else [])}
    lines = [f"{'variant':>10} {'seeds':>5} {'exact match':>13} {'train loss':>10} {'eval loss':>15} "
             f"{'trainable':>9} {'state KiB':>9} {'activ. KiB':>10} {'s':>5}" + (f" {'GPU MiB':>8}" if gpu else "")]
    for name in cols["exact_match"]:
        em, fl, el = (cols[k][name] for k in ("exact_match", "final_loss", "eval_loss"))
        lines.append(f"{name:>10} {em[2]:>5} {em[0]:>6.3f} ± {em[1]:.3f} {fl[0]:>10.3f} "
                     f"{el[0]:>7.3f} ± {el[1]:.3f} {cols['trainable'][name][0]:>9,.0f} "
                     f"{cols['state_bytes'][name][0] / 1024:>9.0f} "
                     f"{cols['activation_bytes'][name][0] / 1024:>10.0f} {cols['seconds'][name][0]:>5.1f}"
                     + (f" {cols['peak_gpu_bytes'][name][0] / 2**20:>8.0f}" if gpu else ""))
    return "\n".join(lines)


def separated(rows: list[dict], a: str, b: str, key: str = "eval_loss") -> bool | None:
    """The kit's rule: is the difference of the means of ``a`` and ``b`` larger than twice the
    larger seed std? None with fewer than 2 seeds of either.

    >>> rows = [{"name": n, "v": v} for n, v in [("a", 1.0), ("a", 1.2), ("b", 2.0), ("b", 2.2)]]
    >>> separated(rows, "a", "b", "v"), separated(rows + [{"name": "b", "v": 0.0}], "a", "b", "v")
    (True, False)
    """
    st = summarize(rows, key)
    (ma, sa, na), (mb, sb, nb) = st[a], st[b]
    if min(na, nb) < 2:
        return None
    return abs(ma - mb) > 2 * max(sa, sb)


def verdict(rows: list[dict], a: str, b: str, key: str = "eval_loss") -> str:
    """:func:`separated` in words. Says "not enough seeds" with fewer than 2 seeds each."""
    st = summarize(rows, key)
    (ma, sa, na), (mb, sb, nb) = st[a], st[b]
    real = separated(rows, a, b, key)
    if real is None:
        return f"{a} vs {b}: {key} {ma:.3f} vs {mb:.3f}, not enough seeds to judge"
    return (f"{a} vs {b}: {key} {ma:.3f} ± {sa:.3f} vs {mb:.3f} ± {sb:.3f} over {min(na, nb)} seeds: "
            f"{'difference larger than 2 std' if real else 'within seed noise'}")
