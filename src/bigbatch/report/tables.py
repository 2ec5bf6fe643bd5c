"""Read a grid directory and reduce it to numbers: per-arm statistics, the diffusion fits, the text.

A grid directory is what :func:`bigbatch.reproduce.run_grid` writes::

    OUT/grid.toml                      resolved preset (arms, seeds, paper numbers, evidence)
    OUT/<slug>/seed<k>/summary.json    one run (written by bigbatch.train.rundir)
    OUT/<slug>/seed<k>/metrics.csv, diffusion.csv

Everything here is plain data in, plain data out (no plotting, no file writing), so the numbers the
report shows can be checked against the runs directly (tests/test_report.py does).
"""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import tomllib

__all__ = [
    "ARMS",
    "ARM_SLUGS",
    "ArmRow",
    "DiffusionFit",
    "GridData",
    "RunData",
    "arm_rows",
    "diffusion_fit",
    "initial_phase_end",
    "load_grid",
    "markdown_table",
    "narrative",
    "table_cells",
]

# The paper's five cumulative columns and their directory names (the contract's slugs).
ARM_SLUGS: dict[str, str] = {
    "SB": "sb",
    "LB": "lb",
    "LB+LR": "lb_lr",
    "LB+LR+GBN": "lb_lr_gbn",
    "LB+LR+GBN+RA": "lb_lr_gbn_ra",
}
ARMS: tuple[str, ...] = tuple(ARM_SLUGS)
_SEED_DIR = re.compile(r"^seed(\d+)$")


@dataclass
class RunData:
    """One run directory: its summary (None when absent) and its metric rows (numbers as floats)."""

    arm: str
    seed: int
    path: Path
    summary: dict[str, Any] | None = None
    metrics: list[dict[str, float]] = field(default_factory=list)
    diffusion: list[dict[str, float]] = field(default_factory=list)

    @property
    def status(self) -> str:
        """``complete``, a summary's other status, ``incomplete`` (no summary) or ``missing``."""
        if self.summary is not None:
            return str(self.summary.get("status", "incomplete"))
        return "incomplete" if self.path.is_dir() else "missing"

    @property
    def complete(self) -> bool:
        return self.status == "complete"


@dataclass
class GridData:
    """A grid: the resolved preset from grid.toml and every expected (arm, seed) run."""

    path: Path
    preset: dict[str, Any]
    arms: list[str]
    seeds: list[int]
    runs: dict[tuple[str, int], RunData]

    def complete_runs(self, arm: str) -> list[RunData]:
        return [self.runs[arm, s] for s in self.seeds if self.runs[arm, s].complete]

    def missing_runs(self) -> list[RunData]:
        return [
            self.runs[a, s] for a in self.arms for s in self.seeds if not self.runs[a, s].complete
        ]

    @property
    def paper(self) -> dict[str, float]:
        """Published accuracy (%) per arm, from the preset's [paper] table (may be empty)."""
        table = self.preset.get("paper") or {}
        return {a: float(v) for a, v in table.items() if a in ARM_SLUGS and _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_csv(path: Path) -> list[dict[str, float]]:
    """CSV rows with every cell as a float (empty or non-numeric cells become NaN)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, text in row.items():
                try:
                    parsed[key] = float(text)
                except (TypeError, ValueError):
                    parsed[key] = math.nan
            rows.append(parsed)
    return rows


def _read_run(arm: str, seed: int, path: Path) -> RunData:
    run = RunData(arm, seed, path)
    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            run.summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            run.summary = None  # a torn write counts as unfinished; the grid reruns it
    run.metrics = _read_csv(path / "metrics.csv")
    run.diffusion = _read_csv(path / "diffusion.csv")
    return run


def load_grid(grid_dir: str | Path) -> GridData:
    """Read grid.toml and every run of the grid.

    Without grid.toml (runs copied by hand) the arms and seeds come from the directories present.

    Args:
        grid_dir: the directory :func:`bigbatch.reproduce.run_grid` wrote.

    Returns:
        GridData with one RunData per expected (arm, seed), present or not.

    Raises:
        ConfigError: ``grid_dir`` does not exist or holds neither grid.toml nor run directories.
    """
    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise ConfigError(f"grid directory {str(grid_dir)!r} does not exist")
    preset: dict[str, Any] = {}
    if (grid_dir / "grid.toml").is_file():
        preset = tomllib.loads((grid_dir / "grid.toml").read_text())
    grid = preset.get("grid", {})
    arms = [a for a in grid.get("arms", []) if a in ARM_SLUGS]
    seeds = grid.get("seeds")
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    found_seeds = set()
    for arm, slug in ARM_SLUGS.items():
        if not (grid_dir / slug).is_dir():
            continue
        if arm not in arms and not grid.get("arms"):
            arms.append(arm)
        for child in (grid_dir / slug).iterdir():
            match = _SEED_DIR.match(child.name)
            if match and child.is_dir():
                found_seeds.add(int(match.group(1)))
    if not preset and not arms:
        raise ConfigError(
            f"{str(grid_dir)!r} is not a grid directory: it has no grid.toml and no run "
            f"directories ({', '.join(ARM_SLUGS.values())}); run `bigbatch reproduce` first"
        )
    arms = [a for a in ARMS if a in arms]  # the paper's column order
    seeds = sorted(set(seeds) if seeds is not None else found_seeds)
    runs = {
        (a, s): _read_run(a, s, grid_dir / ARM_SLUGS[a] / f"seed{s}") for a in arms for s in seeds
    }
    return GridData(grid_dir, preset, arms, seeds, runs)


# ------------------------------------------------------------------------------------------
# Per-arm statistics
# ------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is NaN for fewer than two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


@dataclass
class ArmRow:
    """One row of the results table: statistics over the arm's complete runs (std: n - 1)."""

    arm: str
    seeds: list[int]
    val_error_mean: float
    val_error_std: float
    best_val_error_mean: float
    best_val_error_std: float
    train_error_mean: float
    train_error_std: float
    updates: float
    epochs: float
    wall_time_s: float
    samples_per_s: float
    paper_accuracy: float | None
    expected_seeds: int = (
        0  # seeds the grid asked for (the table shows "2/3" when runs are missing)
    )

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def val_accuracy_mean(self) -> float:
        return 100.0 - self.val_error_mean

    @property
    def gap_mean(self) -> float:
        """Generalization gap: validation error minus training error, in points."""
        return self.val_error_mean - self.train_error_mean


def arm_rows(grid: GridData) -> list[ArmRow]:
    """Statistics per arm over its complete runs, in the paper's column order.

    Values come from each run's summary.json (final_val_error_pct, best_val_error_pct,
    final_train_error_pct, updates, epochs, wall_time_s, samples_per_s).
    """
    rows = []
    paper = grid.paper
    for arm in grid.arms:
        runs = grid.complete_runs(arm)

        def values(key: str, runs: list[RunData] = runs) -> list[float]:
            return [float(r.summary[key]) for r in runs if _is_number(r.summary.get(key))]

        val = _mean_std(values("final_val_error_pct"))
        best = _mean_std(values("best_val_error_pct"))
        train = _mean_std(values("final_train_error_pct"))
        rows.append(
            ArmRow(
                arm=arm,
                seeds=[r.seed for r in runs],
                val_error_mean=val[0],
                val_error_std=val[1],
                best_val_error_mean=best[0],
                best_val_error_std=best[1],
                train_error_mean=train[0],
                train_error_std=train[1],
                updates=_mean_std(values("updates"))[0],
                epochs=_mean_std(values("epochs"))[0],
                wall_time_s=_mean_std(values("wall_time_s"))[0],
                samples_per_s=_mean_std(values("samples_per_s"))[0],
                paper_accuracy=paper.get(arm),
                expected_seeds=len(grid.seeds),
            )
        )
    return rows


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _fmt_pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return _fmt(mean) if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _fmt_count(value: float) -> str:
    if math.isnan(value):
        return "—"
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def table_cells(rows: list[ArmRow]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the results table (shared by the markdown and HTML output)."""
    with_paper = any(r.paper_accuracy is not None for r in rows)
    header = ["arm", "val error % (final)", "val accuracy %"]
    if with_paper:
        header.append("paper accuracy %")
    header += [
        "best val error %",
        "train error %",
        "seeds",
        "updates",
        "epochs",
        "wall time s",
        "samples/s",
    ]
    cells = []
    for r in rows:
        line = [r.arm, _fmt_pm(r.val_error_mean, r.val_error_std), _fmt(r.val_accuracy_mean)]
        if with_paper:
            line.append(_fmt(r.paper_accuracy))
        line += [
            _fmt_pm(r.best_val_error_mean, r.best_val_error_std),
            _fmt_pm(r.train_error_mean, r.train_error_std),
            str(r.n_seeds) if r.n_seeds >= r.expected_seeds else f"{r.n_seeds}/{r.expected_seeds}",
            _fmt_count(r.updates),
            _fmt_count(r.epochs),
            _fmt(r.wall_time_s, 1),
            _fmt(r.samples_per_s, 0),
        ]
        cells.append(line)
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Weight distance ("ultra-slow diffusion")
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# The generated paragraph
# ------------------------------------------------------------------------------------------


def _peak_lr(runs: list[RunData]) -> float:
    lrs = [r.get("lr", math.nan) for run in runs for r in run.diffusion + run.metrics]
    lrs = [lr for lr in lrs if not math.isnan(lr)]
    return max(lrs) if lrs else math.nan


def _spread(*stds: float) -> float:
    """Pooled seed standard deviation of the given arms (0 when no arm has two seeds)."""
    known = [s for s in stds if not math.isnan(s)]
    return math.sqrt(sum(s * s for s in known) / len(known)) if known else 0.0


def narrative(grid: GridData, rows: list[ArmRow], fits: dict[str, DiffusionFit]) -> list[str]:
    """Sentences computed from the numbers (one paragraph per returned string).

    "Within the seed spread of SB" means mean validation error <= SB's mean + SB's standard
    deviation over seeds (with one SB seed: <= SB's error). A gap counts as clear when it exceeds
    twice the pooled seed standard deviation of SB and LB.
    """
    by_arm = {r.arm: r for r in rows if r.n_seeds > 0}
    paragraphs: list[str] = []
    missing = grid.missing_runs()
    if missing:
        names = ", ".join(f"{r.arm} seed {r.seed} ({r.status})" for r in missing)
        paragraphs.append(
            f"This grid is incomplete: {len(missing)} of {len(grid.arms) * len(grid.seeds)} runs "
            f"are not complete: {names}. Statistics below use the complete runs only; run the same "
            "`bigbatch reproduce` command again to finish the missing runs."
            + (
                " Diverged runs are not retried and are left out of their arm's statistics, "
                "which makes that arm look better than it is."
                if any(r.status == "diverged" for r in missing)
                else ""
            )
        )
    sb, lb = by_arm.get("SB"), by_arm.get("LB")
    if sb is None or lb is None:
        paragraphs.append(
            "The generalization gap cannot be measured: SB and LB each need at least one "
            "complete run."
        )
    else:
        paragraphs.append(" ".join(_gap_sentences(grid, by_arm, sb, lb)))

    diffusion = _diffusion_sentences(fits)
    if diffusion:
        paragraphs.append(diffusion)
    paper = _paper_sentence(grid, by_arm)
    if paper:
        paragraphs.append(paper)
    return paragraphs


def _gap_sentences(grid: GridData, by_arm: dict[str, ArmRow], sb: ArmRow, lb: ArmRow) -> list[str]:
    """The gap LB − SB and what each remedy arm does to it."""
    sentences = []
    tol = 0.0 if math.isnan(sb.val_error_std) else sb.val_error_std
    spread = _spread(sb.val_error_std, lb.val_error_std)
    gap = lb.val_error_mean - sb.val_error_mean
    units = f", {abs(gap) / spread:.1f}× the pooled seed standard deviation" if spread > 0 else ""
    if sb.n_seeds < 2 or lb.n_seeds < 2:
        sentences.append(
            "SB or LB has a single seed, so there is no seed spread; the comparisons below are of "
            "single runs and can be noise."
        )
    clear_gap = gap > 2 * spread and gap > 0
    seeds = (
        f"{sb.n_seeds} seed{'s' * (sb.n_seeds != 1)} each"
        if sb.n_seeds == lb.n_seeds
        else f"{lb.n_seeds} and {sb.n_seeds} seeds"
    )
    versus = (
        f"(LB {lb.val_error_mean:.2f} vs SB {sb.val_error_mean:.2f} % validation error, "
        f"{seeds}{units})"
    )
    if clear_gap:
        sentences.append(
            f"Large-batch training (LB, batch {_batch(grid)}) ends {gap:.2f} points worse than SB "
            f"{versus}: a generalization gap."
        )
    elif gap < -2 * spread and gap < 0:
        sentences.append(
            f"LB ends {-gap:.2f} points better than SB {versus}: no generalization gap in this "
            "setting, so the remedies have nothing to close."
        )
    else:
        sentences.append(
            f"LB ends {gap:+.2f} points from SB {versus}, within twice the seed spread: no clear "
            "generalization gap in this setting, so the remedies have nothing to close."
        )
    if lb.updates > 0 and sb.updates > 0:
        sentences.append(
            f"In the same number of epochs ({_fmt_count(lb.epochs)}) LB takes "
            f"{_fmt_count(lb.updates)} updates "
            f"against SB's {_fmt_count(sb.updates)}."
        )

    closed = []
    for arm in ("LB+LR", "LB+LR+GBN", "LB+LR+GBN+RA"):
        row = by_arm.get(arm)
        if row is None:
            continue
        delta = row.val_error_mean - sb.val_error_mean
        if delta <= tol:
            closed.append(arm)
        if not clear_gap:
            sentences.append(f"{arm} ends {delta:+.2f} points from SB.")
        elif delta < -tol:
            sentences.append(f"{arm} closes the gap and ends {-delta:.2f} points better than SB.")
        elif delta <= tol:
            sentences.append(
                f"{arm} closes the gap: {delta:+.2f} points from SB, within SB's seed spread."
            )
        elif row.val_error_mean < lb.val_error_mean:
            share = 100 * (lb.val_error_mean - row.val_error_mean) / gap
            sentences.append(
                f"{arm} recovers {share:.0f}% of the gap ({delta:+.2f} points from SB)."
            )
        elif row.val_error_mean > lb.val_error_mean + max(tol, _nan0(row.val_error_std)):
            sentences.append(_below_lb(row, lb, grid))
        else:
            sentences.append(f"{arm} does not narrow the gap ({delta:+.2f} points from SB, as LB).")
    if clear_gap:
        if closed:
            where = "within SB's seed spread" if tol > 0 else "at or below SB's error"
            sentences.append(f"Arms {where}: " + ", ".join(closed) + ".")
        else:
            spread_text = " within its seed spread" if tol > 0 else ""
            sentences.append(f"No arm reaches SB's error{spread_text}.")
    ra = by_arm.get("LB+LR+GBN+RA")
    if ra is not None and sb.wall_time_s > 0 and not math.isnan(ra.wall_time_s):
        sentences.append(
            f"Regime adaptation costs {_fmt_count(ra.updates)} updates over "
            f"{_fmt_count(ra.epochs)} "
            f"epochs ({ra.wall_time_s / sb.wall_time_s:.1f}× SB's wall time)."
        )
    return sentences


def _nan0(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _batch(grid: GridData) -> str:
    value = grid.preset.get("grid", {}).get("large_batch_size")
    return str(value) if value is not None else "large"


def _below_lb(row: ArmRow, lb: ArmRow, grid: GridData) -> str:
    """The honest sentence for a remedy that made things worse than plain LB."""
    worse = row.val_error_mean - lb.val_error_mean
    text = f"{row.arm} is below LB ({worse:.2f} points more validation error)"
    lr = _peak_lr(grid.complete_runs(row.arm))
    if not math.isnan(row.train_error_mean) and row.train_error_mean > lb.train_error_mean + 1.0:
        lr_text = f" the sqrt-scaled lr {lr:.3g}" if not math.isnan(lr) else " the sqrt-scaled lr"
        text += (
            f": its training error is also higher ({row.train_error_mean:.2f} vs "
            f"{lb.train_error_mean:.2f} % for LB), so it fails to fit rather than to generalize — "
            "with "
            f"only {_fmt_count(row.updates)} updates{lr_text} is unstable (warm-up or more updates "
            "are the levers)."
        )
    else:
        text += (
            f", although it fits the training set as well as LB (train error "
            f"{row.train_error_mean:.2f} vs {lb.train_error_mean:.2f} %)."
        )
    return text


def _diffusion_sentences(fits: dict[str, DiffusionFit]) -> str:
    parts = []
    for arm, fit in fits.items():
        better = "log t fits better" if fit.log_r2 >= fit.sqrt_r2 else "sqrt t fits better"
        # A regime without an lr drop has no "initial phase" end: the fit covers the whole run.
        span = (
            f"before update {_fmt_count(fit.end_update)}"
            if math.isfinite(fit.end_update)
            else "over the whole run (no lr drop)"
        )
        parts.append(
            f"{arm}: ||w_t − w_0|| ≈ {fit.log_a:.3g} + {fit.log_b:.3g}·ln t with "
            f"R² = {fit.log_r2:.3f} "
            f"against R² = {fit.sqrt_r2:.3f} for a + b·sqrt t ({better}; {fit.num_points} points "
            f"{span})"
        )
    if not parts:
        return ""
    return "Weight distance in the initial high-lr phase — " + "; ".join(parts) + "."


def _paper_sentence(grid: GridData, by_arm: dict[str, ArmRow]) -> str:
    paper = grid.paper
    if "SB" not in paper or "LB" not in paper:
        return ""
    ours = ""
    if "SB" in by_arm and "LB" in by_arm:
        ours = (
            f"; here SB−LB accuracy is "
            f"{by_arm['SB'].val_accuracy_mean - by_arm['LB'].val_accuracy_mean:.2f} points"
        )
    text = (
        f"The paper reports {paper['SB']:.2f} % (SB) and {paper['LB']:.2f} % (LB) accuracy, "
        "a gap of "
        f"{paper['SB'] - paper['LB']:.2f} points{ours}."
    )
    if "LB+LR+GBN+RA" in paper and "LB+LR+GBN+RA" in by_arm:
        text += (
            f" With all three remedies the paper reaches {paper['LB+LR+GBN+RA']:.2f} %; this grid "
            f"{by_arm['LB+LR+GBN+RA'].val_accuracy_mean:.2f} %."
        )
    source = (grid.preset.get("paper") or {}).get("source")
    if source:
        text += f" (Paper numbers: {source}.)"
    return text
