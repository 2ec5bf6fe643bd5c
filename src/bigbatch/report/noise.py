"""The report's noise-scale section: B_simple per arm, AdaScale beside +RA, and the advice.

Shown only for grids in which some arm measured the noise scale (``noise_scale``, always on in the
``LB+GBN+AS`` arm): a table of updates, samples, epochs, the final ``B_simple`` and AdaScale's gain
over training (first, mean, last) beside ``LB+LR+GBN+RA``; the lines of
:func:`bigbatch.diagnostics.advise_batch_size` per measured arm (what ``bigbatch advise RUN_DIR``
prints); and a figure of ``B_simple`` (and the gain) against updates.
"""

from __future__ import annotations

import math
from typing import Any

from bigbatch.report.grid import GridData, RunData, is_number, summary_values
from bigbatch.report.stats import fmt_count

__all__ = ["advice_lines", "measured_arms", "noise_cells", "plot_noise_scale"]

_COMPARED = ("LB+LR+GBN+RA", "LB+GBN+AS")


def _series(run: RunData, key: str) -> list[float]:
    return [r[key] for r in run.metrics if is_number(r.get(key)) and not math.isnan(r[key])]


def measured_arms(grid: GridData) -> list[str]:
    """The arms with a complete run that logged a ``b_simple``."""
    return [a for a in grid.arms if any(_series(r, "b_simple") for r in grid.complete_runs(a))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _num(value: float, digits: str = ".3g") -> str:
    return "—" if not is_number(value) or math.isnan(value) else format(value, digits)


def noise_cells(grid: GridData) -> tuple[list[str], list[list[str]]]:
    """Header and rows: +RA, AdaScale and every measured arm (means over complete seeds)."""
    header = ["arm", "updates", "samples", "epochs", "final B_simple", "AdaScale gain first / "
              "mean / last", "final val error %"]
    measured = measured_arms(grid)
    arms = [a for a in grid.arms if a in _COMPARED or a in measured]
    cells = []
    for arm in arms:
        runs = grid.complete_runs(arm)
        if not runs:
            continue

        def mean_of(key: str, runs=runs) -> float:
            return _mean(summary_values(runs, key))

        gains = [g for g in (_series(r, "adascale_gain") for r in runs) if g]
        parts = ([g[0] for g in gains], [_mean(g) for g in gains], [g[-1] for g in gains])
        gain = " / ".join(_num(_mean(p)) for p in parts) if gains else "—"
        finals = [s[-1] for s in (_series(r, "b_simple") for r in runs) if s]
        cells.append([arm, fmt_count(mean_of("updates")), fmt_count(mean_of("samples")),
                      _num(mean_of("epochs"), ".4g"), _num(_mean(finals), ".4g"), gain,
                      _num(mean_of("final_val_error_pct"), ".2f")])
    return header, cells


def advice_lines(grid: GridData) -> list[str]:
    """``advise_batch_size(...).lines()`` for the first complete seed of every measured arm that
    has a ``b_simple`` series; one line saying why where there is no advice to give (e.g. no
    positive ``B_simple``), as ``bigbatch advise`` says it."""
    from bigbatch.diagnostics import advise_batch_size

    out = []
    for arm in measured_arms(grid):
        run = next(r for r in grid.complete_runs(arm) if _series(r, "b_simple"))
        batch, base = run.summary.get("batch_size"), run.summary.get("base_batch_size")
        if not isinstance(batch, int):
            continue
        base = base if isinstance(base, int) and base <= batch else None
        try:
            lines = advise_batch_size(_series(run, "b_simple"), batch, base).lines()
        except ValueError as e:
            lines = [f"no advice: {e}"]
        out += [f"{arm} (seed {run.seed}): {line}" for line in lines]
    return out


def plot_noise_scale(grid: GridData) -> bytes | None:
    """``B_simple`` against updates per measured arm; AdaScale's gain beside it when present."""
    from bigbatch.report import plots

    arms = measured_arms(grid)
    if not arms:
        return None
    with_gain = [a for a in arms if any(_series(r, "adascale_gain") for r in
                                        grid.complete_runs(a))]
    fig, axes = plots.plt.subplots(1, 2 if with_gain else 1, figsize=(11 if with_gain else 7, 4.2),
                                   squeeze=False)
    for ax, key, arms_here, label in ((axes[0][0], "b_simple", arms, "B_simple"),
                                      (axes[0][-1], "adascale_gain", with_gain, "AdaScale gain")):
        if key == "adascale_gain" and not with_gain:
            continue
        _draw(ax, grid, arms_here, key, label)
    return plots._png(fig)


def _draw(ax: Any, grid: GridData, arms: list[str], key: str, label: str) -> None:
    from bigbatch.report import plots

    for arm in arms:
        runs = [r for r in grid.complete_runs(arm) if _series(r, key)]  # the seeds that measured
        curve = plots._curve(runs, key, "updates")
        if curve is None:
            continue
        xs, mean, low, high = curve
        ax.plot(xs, mean, color=plots._COLORS.get(arm), label=arm, marker=".")
        if len(runs) > 1:
            ax.fill_between(xs, low, high, color=plots._COLORS.get(arm), alpha=0.2, linewidth=0)
    ax.set_xlabel("updates")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs updates (mean; band: min to max over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
