"""AdaScale (``LB+GBN+AS``) against regime adaptation (``LB+LR+GBN+RA``): updates and samples to
a validation-error target (issue 16, item 5).

Reads a ``bigbatch reproduce`` grid that ran both arms (e.g. ``bigbatch reproduce --preset demo
--arms LB+LR+GBN+RA LB+GBN+AS --seeds 1 --out DIR``) and prints, per target, the first evaluation
of each arm (seed 0) at or below it: its updates and samples, and the AS / RA ratios; then each
arm's whole run (updates, samples, epochs, final error) and AdaScale's gain over training.

Usage: python benchmarks/adascale_vs_ra.py GRID_DIR [--targets 15 14 13]
Results, with the machine they came from: benchmarks/RESULTS.md, section "AdaScale vs +RA".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bigbatch.train.metrics import read_rows

ARMS = {"LB+LR+GBN+RA": "lb_lr_gbn_ra", "LB+GBN+AS": "lb_gbn_as"}


def first_at(rows: list[dict], target: float) -> dict | None:
    """The first metrics row with ``val_error_pct <= target`` (None if never)."""
    return next((r for r in rows if r["val_error_pct"] <= target), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid_dir", type=Path)
    p.add_argument("--targets", type=float, nargs="+", default=[16.0, 15.0, 14.0, 13.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    runs = {arm: args.grid_dir / slug / f"seed{args.seed}" for arm, slug in ARMS.items()}
    rows = {arm: read_rows(d / "metrics.csv") for arm, d in runs.items()}
    print("| target val error % | RA updates | RA samples | AS updates | AS samples | "
          "AS/RA updates | AS/RA samples |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for target in args.targets:
        ra, ada = (first_at(rows[a], target) for a in ARMS)
        cells = [f"{r['updates']} | {r['samples']}" if r else "not reached | -" for r in (ra, ada)]
        ratio = (f"{ada['updates'] / ra['updates']:.3g} | {ada['samples'] / ra['samples']:.3g}"
                 if ra and ada else "- | -")
        print(f"| {target:g} | {cells[0]} | {cells[1]} | {ratio} |")
    for arm, run_dir in runs.items():
        summary = json.loads((run_dir / "summary.json").read_text())
        gains = [r["adascale_gain"] for r in rows[arm] if isinstance(r.get("adascale_gain"), float)]
        gain = (f", gain first {gains[0]:.3g}, mean {sum(gains) / len(gains):.3g}, last "
                f"{gains[-1]:.3g}" if gains else "")
        print(f"{arm}: {summary['updates']} updates, {summary['samples']} samples, "
              f"{summary['epochs']:.4g} epochs, final val error "
              f"{summary['final_val_error_pct']:.2f}%, best {summary['best_val_error_pct']:.2f}%, "
              f"{summary['wall_time_s']:.0f} s on {summary['device_name']}{gain}")


if __name__ == "__main__":
    main()
