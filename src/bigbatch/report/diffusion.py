"""The paper's "ultra-slow diffusion": fits of ||w_t - w_0|| over the initial high-lr phase.

Hoffer et al. 2017, Section 3: in the first phase the weight distance grows like log t. Each arm's
seeds are pooled and fitted with ``a + b ln t`` and, for contrast, ``a + b sqrt t``
(:mod:`bigbatch.diagnostics` does the least squares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bigbatch.report.grid import GridData

__all__ = ["DiffusionFit", "diffusion_fit", "initial_phase_end"]


@dataclass
class DiffusionFit:
    """Fits of ||w_t - w_0|| over the initial high-lr phase of one arm (all its seeds pooled)."""

    arm: str
    end_update: float  # the fit uses 1 <= t < end_update
    num_points: int
    log_a: float
    log_b: float
    log_r2: float
    sqrt_a: float
    sqrt_b: float
    sqrt_r2: float


def initial_phase_end(rows: list[dict[str, float]]) -> float:
    """The first update at which the lr has dropped below 90% of its peak (inf if it never does).

    For a step schedule this is the first lr drop (the paper fits its log-t line before it); a
    linear warm-up before the peak is part of the initial phase; for a cosine schedule it is where
    the lr has annealed by 10%.
    """
    lrs = [(r["updates"], r["lr"]) for r in rows if not math.isnan(r.get("lr", math.nan))]
    if not lrs:
        return math.inf
    lrs.sort()
    peak_index = max(range(len(lrs)), key=lambda i: lrs[i][1])
    peak = lrs[peak_index][1]
    for updates, lr in lrs[peak_index:]:
        if lr < 0.9 * peak:
            return updates
    return math.inf


def diffusion_fit(grid: GridData, arm: str) -> DiffusionFit | None:
    """Fit d = a + b ln t and d = a + b sqrt t over the arm's initial phase (None if < 5 points)."""
    t: list[float] = []
    d: list[float] = []
    end = math.inf
    for run in grid.complete_runs(arm):
        run_end = initial_phase_end(run.diffusion)
        end = min(end, run_end)
        for row in run.diffusion:
            u, w = row.get("updates", math.nan), row.get("weight_distance", math.nan)
            if u >= 1 and u < run_end and not math.isnan(w):
                t.append(u)
                d.append(w)
    if len(set(t)) < 5:  # fewer distinct updates fit any curve: no evidence either way
        return None
    from bigbatch.diagnostics import fit_log, fit_sqrt

    log, sqrt = fit_log(t, d), fit_sqrt(t, d)
    return DiffusionFit(arm, end, len(t), log.a, log.b, log.r2, sqrt.a, sqrt.b, sqrt.r2)
