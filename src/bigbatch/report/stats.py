"""Per-arm statistics and the cells of the report's two tables: results, and what each arm changes.

Plain data in (a :class:`~bigbatch.report.grid.GridData`), plain data out. Standard deviations
are over seeds with n - 1; an arm with one complete seed has none (NaN, shown as "—").
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from bigbatch.errors import ConfigError
from bigbatch.report.grid import GridData, RunData, summary_values

__all__ = [
    "SETTING_COLUMNS",
    "ArmRow",
    "arm_rows",
    "arm_settings",
    "fmt_count",
    "markdown_table",
    "settings_cells",
    "table_cells",
    "train_samples_per_s",
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std is NaN for fewer than two values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


def train_samples_per_s(run: RunData) -> float:
    """Training samples per second of training time, evaluation excluded (NaN without metrics).

    The engine times each update (loading its batch included) and stops the clock for evaluations
    and checkpoints; each metrics.csv row carries ``samples_per_s`` = the interval's training
    samples / the interval's training time. Summed over the intervals this is the run's total
    training samples over its total training time: ``summary.json``'s ``train_samples_per_s``,
    read where present (summaries before 0.2 lack it, and their ``samples_per_s`` counted the
    evaluations too, so for them it is computed from the rows).
    """
    recorded = (run.summary or {}).get("train_samples_per_s")
    if isinstance(recorded, (int, float)) and recorded > 0:
        return float(recorded)
    samples = seconds = previous = 0.0
    for row in sorted(run.metrics, key=lambda r: r.get("updates", 0.0)):
        count, rate = row.get("samples", math.nan) - previous, row.get("samples_per_s", math.nan)
        if math.isnan(count):
            continue
        previous = row["samples"]
        if count > 0 and rate > 0 and math.isfinite(rate):
            samples, seconds = samples + count, seconds + count / rate
    return samples / seconds if seconds > 0 else math.nan


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
    wall_time_s: float  # the run's wall time, evaluation included
    train_samples_per_s: float  # see train_samples_per_s(): evaluation excluded
    paper_accuracy: float | None
    expected_seeds: int = 0  # seeds the grid asked for (shown as "2/3" when runs are missing)

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

    Errors, updates, epochs and wall time come from each run's summary.json; the training
    throughput from its metrics.csv (:func:`train_samples_per_s`).
    """
    rows = []
    paper = grid.paper
    for arm in grid.arms:
        runs = grid.complete_runs(arm)
        val = _mean_std(summary_values(runs, "final_val_error_pct"))
        best = _mean_std(summary_values(runs, "best_val_error_pct"))
        train = _mean_std(summary_values(runs, "final_train_error_pct"))
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
                updates=_mean_std(summary_values(runs, "updates"))[0],
                epochs=_mean_std(summary_values(runs, "epochs"))[0],
                wall_time_s=_mean_std(summary_values(runs, "wall_time_s"))[0],
                train_samples_per_s=_mean_std([train_samples_per_s(r) for r in runs])[0],
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


def fmt_count(value: float | None) -> str:
    """A count as an integer when it is one ("640"), else with one decimal; "—" when unknown."""
    if value is None or math.isnan(value):
        return "—"
    return str(int(round(value))) if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def table_cells(rows: list[ArmRow]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the results table (shared by the markdown and HTML output)."""
    with_paper = any(r.paper_accuracy is not None for r in rows)
    header = ["arm", "val error % (final)"]
    if with_paper:
        header.append("paper accuracy %")
    header += ["best val error %", "train error %", "seeds", "updates", "epochs",
               "wall time s (with eval)", "train samples/s (eval excluded)"]  # fmt: skip
    cells = []
    for r in rows:
        line = [r.arm, _fmt_pm(r.val_error_mean, r.val_error_std)]
        if with_paper:
            line.append(_fmt(r.paper_accuracy))
        line += [
            _fmt_pm(r.best_val_error_mean, r.best_val_error_std),
            _fmt_pm(r.train_error_mean, r.train_error_std),
            str(r.n_seeds) if r.n_seeds >= r.expected_seeds else f"{r.n_seeds}/{r.expected_seeds}",
            fmt_count(r.updates),
            fmt_count(r.epochs),
            _fmt(r.wall_time_s, 1),
            _fmt(r.train_samples_per_s, 0),
        ]
        cells.append(line)
    return header, cells


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# What each arm changes
# ------------------------------------------------------------------------------------------

# (column, key): the settings of one arm, in the table's order.
SETTING_COLUMNS = (
    ("batch", "batch_size"),
    ("ghost batch", "ghost_batch_size"),
    ("lr (peak)", "lr"),
    ("lr scaling", "lr_scaling"),
    ("epochs", "epochs"),
    ("lr drops at epochs", "milestones"),
    ("warm-up epochs", "warmup_epochs"),
    ("updates", "updates"),
    ("samples", "samples"),
)


def _regimes(grid: GridData) -> dict[str, object]:
    """Each arm's effective regime, from grid.toml (empty when it is absent or invalid)."""
    from bigbatch.reproduce import arm_configs, load_preset
    from bigbatch.train.config import resolve_regime

    path = grid.path / "grid.toml"
    if not path.is_file() or not grid.seeds:
        return {}
    try:
        configs = arm_configs(load_preset(path), seed=grid.seeds[0])
        # A regime is in epochs: the dataset size only matters for update counts (from the runs).
        return {arm: (cfg, resolve_regime(cfg, dataset_size=1)[1]) for arm, cfg in configs.items()}
    except ConfigError:
        return {}


def arm_settings(grid: GridData) -> list[dict[str, object]]:
    """What each arm ran with, and what it changed from the previous arm.

    Batch, ghost batch, peak lr and its scaling rule, epochs, lr drops and warm-up come from
    grid.toml through :func:`bigbatch.reproduce.arm_configs` and the engine's own regime
    resolution (without grid.toml: from the runs' summaries, lr and schedule unknown); updates and
    samples are means over the arm's complete runs.

    Returns:
        One dict per arm with ``arm``, the keys of :data:`SETTING_COLUMNS` (None where unknown)
        and ``changes``: the columns that differ from the previous arm.
    """
    regimes = _regimes(grid)
    out: list[dict[str, object]] = []
    for arm in grid.arms:
        runs = grid.complete_runs(arm)
        setting: dict[str, object] = {"arm": arm}
        if arm in regimes:
            cfg, regime = regimes[arm]
            setting.update(batch_size=cfg.batch_size, ghost_batch_size=cfg.ghost_batch_size,
                           lr=regime.phases[0]["lr"], lr_scaling=cfg.lr_scaling,
                           epochs=regime.epochs, milestones=regime.milestones,
                           warmup_epochs=regime.warmup_epochs)  # fmt: skip
        elif runs:  # no grid.toml: what the summaries say
            first = runs[0].summary
            for key in ("batch_size", "ghost_batch_size", "lr_scaling", "epochs"):
                setting[key] = first.get(key)
        # AdaScale's regime is its longest run; the epochs it took are the runs' own.
        adascale = setting.get("lr_scaling") == "adascale"
        for key in ("updates", "samples", "epochs") if adascale else ("updates", "samples"):
            found = summary_values(runs, key)
            setting[key] = _mean_std(found)[0] if found else None
        previous = out[-1] if out else None
        setting["changes"] = [
            column for column, key in SETTING_COLUMNS
            if previous is not None and setting.get(key) != previous.get(key)
        ]  # fmt: skip
        out.append(setting)
    return out


def _setting_text(key: str, value: object) -> str:
    if value is None:
        return "—" if key not in ("ghost_batch_size",) else "none"
    if key == "milestones":
        return ", ".join(f"{m:g}" for m in value) or "none"  # type: ignore[attr-defined]
    if key == "lr":
        return f"{value:.4g}"
    if isinstance(value, float):
        return fmt_count(value)
    return str(value)


def settings_cells(settings: list[dict[str, object]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table of what each arm changes (the first column says what)."""
    header = ["arm", "changes from the previous arm", *(c for c, _ in SETTING_COLUMNS)]
    cells = []
    for i, s in enumerate(settings):
        changes = ", ".join(s["changes"]) if s["changes"] else ("—" if i == 0 else "nothing")
        cells.append([str(s["arm"]), changes,
                      *(_setting_text(k, s.get(k)) for _, k in SETTING_COLUMNS)])  # fmt: skip
    return header, cells
