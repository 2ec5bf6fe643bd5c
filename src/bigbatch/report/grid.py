"""Read a grid directory: the resolved preset from grid.toml and every run's files.

A grid directory is what :func:`bigbatch.reproduce.run_grid` writes::

    OUT/grid.toml                      resolved preset (arms, seeds, paper numbers, evidence)
    OUT/<slug>/seed<k>/summary.json    one run (written by bigbatch.train.rundir)
    OUT/<slug>/seed<k>/metrics.csv, diffusion.csv

Plain data in, plain data out (no plotting, no file writing), so the numbers the report shows can
be checked against the runs directly (tests/test_report.py does).
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.fileio import read_summary, tomllib
from bigbatch.reproduce import ARM_SLUGS, ARMS

__all__ = ["GridData", "RunData", "is_number", "load_grid", "nan0", "summary_values"]

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
        return {a: float(v) for a, v in table.items() if a in ARM_SLUGS and is_number(v)}


def is_number(value: Any) -> bool:
    """A real number (int or float, not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def summary_values(runs: list[RunData], key: str) -> list[float]:
    """``key`` of each run's summary.json, as floats, where it is a number (complete runs)."""
    return [float(r.summary[key]) for r in runs if is_number(r.summary.get(key))]


def nan0(value: float) -> float:
    """NaN as 0 (an error bar or tolerance that is unknown draws as none)."""
    return 0.0 if math.isnan(value) else value


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
    # Absent, torn (a killed write) or not a table: unfinished, and the grid reruns it.
    run = RunData(arm, seed, path, summary=read_summary(path) or None)
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
