"""Figures of a grid as PNG bytes (matplotlib, Agg backend: no display needed).

Each function returns the PNG bytes, or None when the grid has no data for that figure; the renderer
writes them beside report.md and embeds them in report.html.
"""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: the report is written on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bigbatch.report.tables import ArmRow, DiffusionFit, GridData, RunData  # noqa: E402

__all__ = ["plot_diffusion", "plot_error_curves", "plot_generalization_gap"]

_COLORS = {
    "SB": "#1f77b4",
    "LB": "#d62728",
    "LB+LR": "#ff7f0e",
    "LB+LR+GBN": "#9467bd",
    "LB+LR+GBN+RA": "#2ca02c",
}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _curve(runs: list[RunData], key: str, x: str) -> tuple[np.ndarray, ...] | None:
    """Mean, min and max of ``key`` over seeds at the evaluation points every seed has.

    Seeds of one arm evaluate at the same update counts, so points are matched by ``updates``;
    ``x`` ("epoch" or "updates") is the coordinate returned.
    """
    per_run = []
    for run in runs:
        points = {}
        for row in run.metrics:
            u, v = row.get("updates", math.nan), row.get(key, math.nan)
            if not (math.isnan(u) or math.isnan(v)):
                points[u] = (row.get(x, math.nan), v)
        per_run.append(points)
    if not per_run:
        return None
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    if x == "updates":
        common = [u for u in common if u > 0]  # log axis
    if not common:
        return None
    xs = np.array([per_run[0][u][0] for u in common])
    values = np.array([[p[u][1] for u in common] for p in per_run])
    return xs, values.mean(0), values.min(0), values.max(0)


def plot_error_curves(grid: GridData, x: str = "epoch") -> bytes | None:
    """Validation error vs epochs (linear) or updates (log), mean over seeds with a min-max band."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    final_xs = []
    for arm in grid.arms:
        curve = _curve(grid.complete_runs(arm), "val_error_pct", x)
        if curve is None:
            continue
        xs, mean, low, high = curve
        final_xs.append(float(xs[-1]))
        n = len(grid.complete_runs(arm))
        ax.plot(xs, mean, color=_COLORS.get(arm), label=f"{arm} ({n} seed{'s' * (n != 1)})")
        if n > 1:
            ax.fill_between(xs, low, high, color=_COLORS.get(arm), alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    # Regime adaptation stretches training (x32 epochs in the demo): on a linear axis the other
    # arms would be squeezed into the first few percent, so epochs go on a log axis then too.
    log_x = x == "updates" or (min(final_xs) > 0 and max(final_xs) / min(final_xs) > 4)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{'updates' if x == 'updates' else 'epochs'}{' (log scale)' if log_x else ''}")
    ax.set_ylabel("validation error %")
    ax.set_title(
        f"Validation error vs {'updates' if x == 'updates' else 'epochs'} (mean, min-max band)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def plot_diffusion(grid: GridData, fits: dict[str, DiffusionFit]) -> bytes | None:
    """||w_t - w_0|| vs updates (log x) for SB and LB, with the fitted log-t and sqrt-t curves."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for arm in ("SB", "LB"):
        if arm not in grid.arms:
            continue
        color = _COLORS[arm]
        for i, run in enumerate(grid.complete_runs(arm)):
            points = sorted(
                (r["updates"], r["weight_distance"])
                for r in run.diffusion
                if r.get("updates", 0) >= 1 and not math.isnan(r.get("weight_distance", math.nan))
            )
            if points:
                t, d = zip(*points, strict=True)
                ax.plot(
                    t,
                    d,
                    ".",
                    color=color,
                    alpha=0.5,
                    markersize=4,
                    label=f"{arm} (seeds)" if i == 0 else None,
                )
                drawn = True
        fit = fits.get(arm)
        if fit is not None:
            end = fit.end_update if math.isfinite(fit.end_update) else _max_update(grid, arm)
            t = np.geomspace(1, max(end, 2), 100)
            ax.plot(
                t,
                fit.log_a + fit.log_b * np.log(t),
                "-",
                color=color,
                label=f"{arm}: a + b·ln t, R²={fit.log_r2:.3f}",
            )
            ax.plot(
                t,
                fit.sqrt_a + fit.sqrt_b * np.sqrt(t),
                ":",
                color=color,
                label=f"{arm}: a + b·√t, R²={fit.sqrt_r2:.3f}",
            )
            if math.isfinite(fit.end_update):
                ax.axvline(fit.end_update, color=color, alpha=0.3, linestyle="--")
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("updates t (log scale); dashed: first update after the lr drop (fit range ends)")
    ax.set_ylabel("||w_t − w_0||")
    ax.set_title("Weight distance from initialisation (fits over the initial high-lr phase)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def _max_update(grid: GridData, arm: str) -> float:
    return max(
        (r["updates"] for run in grid.complete_runs(arm) for r in run.diffusion), default=2.0
    )


def plot_generalization_gap(rows: list[ArmRow]) -> bytes | None:
    """Final training vs validation error per arm (mean ± std): the generalization gap."""
    rows = [r for r in rows if r.n_seeds > 0]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    x = np.arange(len(rows))
    width = 0.38
    train = [r.train_error_mean for r in rows]
    val = [r.val_error_mean for r in rows]
    ax.bar(
        x - width / 2,
        train,
        width,
        yerr=[_nan0(r.train_error_std) for r in rows],
        label="train error",
        color="#aec7e8",
        capsize=3,
    )
    ax.bar(
        x + width / 2,
        val,
        width,
        yerr=[_nan0(r.val_error_std) for r in rows],
        label="validation error",
        color="#1f77b4",
        capsize=3,
    )
    for i, r in enumerate(rows):
        if not math.isnan(r.gap_mean):
            ax.annotate(
                f"gap {r.gap_mean:.1f}",
                (x[i], max(train[i], val[i])),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 4),
                textcoords="offset points",
            )
    ax.set_xticks(x, [r.arm for r in rows], fontsize=8)
    ax.set_ylabel("error % (final, mean ± std over seeds)")
    ax.set_title("Training vs validation error per arm (generalization gap)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _nan0(value: float) -> float:
    return 0.0 if math.isnan(value) else value
