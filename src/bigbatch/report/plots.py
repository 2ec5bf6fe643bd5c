"""Figures of a grid as PNG bytes (matplotlib, Agg backend: no display needed).

Each function returns the PNG bytes, or None when the grid has no data for that figure; the renderer
writes them beside report.md and embeds them in report.html.
"""

from __future__ import annotations

import io
import math

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # before pyplot: the report is written on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bigbatch.report.diffusion import DiffusionFit  # noqa: E402
from bigbatch.report.grid import GridData, RunData, nan0  # noqa: E402
from bigbatch.report.stats import ArmRow  # noqa: E402

__all__ = ["plot_curves", "plot_diffusion", "plot_generalization_gap", "plot_losses",
           "plot_lr_schedules"]  # fmt: skip

_COLORS = {
    "SB": "#1f77b4",
    "LB": "#d62728",
    "LB+LR": "#ff7f0e",
    "LB+LR+GBN": "#9467bd",
    "LB+LR+GBN+RA": "#2ca02c",
    "LB+GBN+AS": "#17becf",
    "LB+LARS": "#8c564b",
    "LB+LAMB": "#e377c2",
}


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _curve(runs: list[RunData], key: str, x: str) -> tuple[np.ndarray, ...] | None:
    """Mean x, and mean, min and max of ``key`` over seeds at the evaluations every seed has.

    Seeds of one arm evaluate at the same update counts, so points are matched by ``updates``;
    ``x`` ("epoch", "updates" or "wall_time_s") is averaged over the seeds (wall times differ).
    """
    per_run = []
    for run in runs:
        points = {}
        for row in run.metrics:
            u, v, at = row.get("updates", math.nan), row.get(key, math.nan), row.get(x, math.nan)
            if not (math.isnan(u) or math.isnan(v) or math.isnan(at)):
                points[u] = (at, v)
        per_run.append(points)
    if not per_run:
        return None
    common = sorted(set.intersection(*(set(p) for p in per_run)))
    common = [u for u in common if u > 0]  # the evaluation before training has no place on a log
    if not common:
        return None
    xs = np.array([[p[u][0] for u in common] for p in per_run]).mean(0)
    values = np.array([[p[u][1] for u in common] for p in per_run])
    return xs, values.mean(0), values.min(0), values.max(0)


_X_LABELS = {"epoch": "epochs", "updates": "updates", "wall_time_s": "wall-clock time s"}


def _draw_curves(ax, grid: GridData, key: str, x: str, log_x: bool) -> None:
    """One line (mean) and band (min-max over seeds) per arm."""
    for arm in grid.arms:
        runs = grid.complete_runs(arm)
        curve = _curve(runs, key, x)
        if curve is None:
            continue
        xs, mean, low, high = curve
        n = len(runs)
        ax.plot(xs, mean, color=_COLORS.get(arm), label=f"{arm} ({n} seed{'s' * (n != 1)})",
                marker="." if len(xs) < 12 else None)  # fmt: skip
        if n > 1:
            ax.fill_between(xs, low, high, color=_COLORS.get(arm), alpha=0.2, linewidth=0)
    if log_x:
        ax.set_xscale("log")
        # Labelled minor ticks on a short log range (0.03 s to 0.8 s) overprint each other.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(f"{_X_LABELS[x]}{' (log scale)' if log_x else ''}")
    ax.grid(alpha=0.3)


def plot_curves(grid: GridData, key: str = "val_error_pct", x: str = "epoch") -> bytes | None:
    """``key`` (a metrics.csv column) against epochs, updates or wall-clock time, per arm.

    Updates go on a log axis. Epochs and wall time get a linear axis, and beside it a log axis when
    one arm runs more than 4× longer than another (regime adaptation stretches training ×B/B0):
    on the linear axis the short arms are squeezed into a stub, on the log one the long arm is.
    """
    curves = (_curve(grid.complete_runs(arm), key, x) for arm in grid.arms)
    final_xs = [float(c[0][-1]) for c in curves if c is not None]  # each drawn arm's last x
    if not final_xs:
        return None
    stretched = min(final_xs) > 0 and max(final_xs) / min(final_xs) > 4
    scales = [True] if x == "updates" else [False, True] if stretched else [False]
    fig, axes = plt.subplots(1, len(scales), figsize=(7 * len(scales), 4.2), squeeze=False)
    for ax, log_x in zip(axes[0], scales, strict=True):
        _draw_curves(ax, grid, key, x, log_x)
        ax.set_ylabel(_Y_LABELS.get(key, key))
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{_Y_LABELS.get(key, key)} vs {_X_LABELS[x]} (mean over seeds, min-max band)")
    return _png(fig)


_Y_LABELS = {"val_error_pct": "validation error %", "train_loss": "training loss",
             "val_loss": "validation loss"}  # fmt: skip


def plot_losses(grid: GridData) -> bytes | None:
    """Training and validation loss against epochs per arm (log epochs when one arm is long)."""
    curves = [(key, [_curve(grid.complete_runs(a), key, "epoch") for a in grid.arms])
              for key in ("train_loss", "val_loss")]  # fmt: skip
    if not any(c is not None for _, per_arm in curves for c in per_arm):
        return None
    final_xs = [float(c[0][-1]) for _, per_arm in curves for c in per_arm if c is not None]
    log_x = min(final_xs) > 0 and max(final_xs) / min(final_xs) > 4
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, (key, _) in zip(axes, curves, strict=True):
        _draw_curves(ax, grid, key, "epoch", log_x)
        ax.set_title(_Y_LABELS[key])
    axes[0].set_ylabel("loss (mean over seeds, min-max band)")
    axes[0].legend(fontsize=8)
    return _png(fig)


def plot_lr_schedules(grid: GridData) -> bytes | None:
    """Each arm's learning rate against updates, as the run logged it (first complete seed)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for i, arm in enumerate(grid.arms):
        runs = grid.complete_runs(arm)
        if not runs:
            continue
        points = sorted({(r["updates"], r["lr"]) for r in runs[0].diffusion + runs[0].metrics
                         if r.get("updates", 0) >= 1 and r.get("lr", 0) > 0})  # fmt: skip
        if points:
            u, lr = zip(*points, strict=True)
            # A logged lr is the one the update at that count used: it holds back to the last point.
            # Arms often share a schedule (LB+LR and LB+LR+GBN): later arms draw thinner on top.
            ax.plot(u, lr, color=_COLORS.get(arm), drawstyle="steps-pre", label=arm,
                    linewidth=3.5 - 0.6 * i)  # fmt: skip
            drawn = True
    if drawn:
        ax.set_yscale("log")
    return _finish_log_x(fig, ax, drawn, "updates (log scale)", "learning rate (log scale)",
                         "Learning-rate schedule of each arm, as logged")  # fmt: skip


def _finish_log_x(fig, ax, drawn: bool, xlabel: str, ylabel: str, title: str,
                  legend_size: int = 8) -> bytes | None:  # fmt: skip
    """A log x axis, labels, grid and legend, then the PNG; None (figure closed) if not drawn."""
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=legend_size)
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
    return _finish_log_x(
        fig, ax, drawn,
        "updates t (log scale); dashed: first update after the lr drop (fit range ends)",
        "||w_t − w_0||",
        "Weight distance from initialisation (fits over the initial high-lr phase)",
        legend_size=7,
    )  # fmt: skip


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
    tops = np.zeros(len(rows))
    for offset, name, color, mean_key, std_key in (
        (-width / 2, "train error", "#aec7e8", "train_error_mean", "train_error_std"),
        (width / 2, "validation error", "#1f77b4", "val_error_mean", "val_error_std"),
    ):
        means = np.array([getattr(r, mean_key) for r in rows])
        stds = np.array([nan0(getattr(r, std_key)) for r in rows])
        ax.bar(x + offset, means, width, yerr=stds, label=name, color=color, capsize=3)
        tops = np.fmax(tops, means + stds)
    for i, r in enumerate(rows):
        if not math.isnan(r.gap_mean):  # above the higher error bar, so the two never overlap
            ax.annotate(f"gap {r.gap_mean:.1f}", (x[i], tops[i]), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 3), textcoords="offset points")  # fmt: skip
    # Headroom above the highest label for the legend, so neither covers a bar or a label.
    ax.set_ylim(0, float(np.nanmax(tops)) * 1.3 if np.nanmax(tops) > 0 else 1)
    ax.set_xticks(x, [r.arm for r in rows], fontsize=8)
    ax.set_ylabel("error % (final, mean ± std over seeds)")
    ax.set_title("Training vs validation error per arm (generalization gap)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncols=2)
    return _png(fig)
