"""The report on synthetic grid directories with known numbers (no training involved)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from bigbatch.errors import ConfigError
from bigbatch.report import write_report
from bigbatch.report.diffusion import diffusion_fit, initial_phase_end
from bigbatch.report.grid import load_grid
from bigbatch.report.prose import narrative
from bigbatch.report.stats import arm_rows, arm_settings, table_cells
from bigbatch.reproduce import ARM_SLUGS
from bigbatch.reproduce import PAPER_ARMS as ARMS  # the five arms of every preset

PAPER = {"SB": 87.8, "LB": 83.95, "LB+LR": 86.15, "LB+LR+GBN": 86.4, "LB+LR+GBN+RA": 88.2,
         "source": "Table 1, recalled"}  # fmt: skip
SEEDS = [0, 1, 2]
METRIC_KEYS = [
    "updates", "epoch", "samples", "lr", "train_loss", "train_error_pct", "val_loss",
    "val_error_pct", "weight_distance", "wall_time_s", "samples_per_s",
]  # fmt: skip


def _write_csv(path: Path, keys: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_run(
    grid_dir: Path,
    arm: str,
    seed: int,
    *,
    val_error: float,
    train_error: float,
    updates: int,
    epochs: int,
    lr: float = 0.1,
    drop_update: int | None = None,
    a: float = 1.0,
    b: float = 0.5,
    wall_time_s: float = 10.0,
    samples_per_s: float = 1000.0,
    lr_scaling: str = "sqrt",
) -> Path:
    """A run dir in the engine's format; ||w_t - w_0|| = a + b ln t before the first lr drop.

    The training throughput of evaluation interval e is ``interval_rate(samples_per_s, e)``;
    summary.json's samples_per_s counts the evaluations too (samples / wall time), as the engine's.
    """
    run = grid_dir / ARM_SLUGS[arm] / f"seed{seed}"
    run.mkdir(parents=True)
    drop_update = drop_update or updates // 2
    per_epoch = updates // epochs
    metrics = []
    for e in range(1, epochs + 1):
        u = e * per_epoch
        frac = e / epochs  # errors fall linearly to their final value
        metrics.append(
            {"updates": u, "epoch": e, "samples": u * 100, "lr": lr if u < drop_update else lr / 10,
             "train_loss": 0.5, "train_error_pct": train_error + 20 * (1 - frac), "val_loss": 0.6,
             "val_error_pct": val_error + 20 * (1 - frac), "weight_distance": a + b * math.log(u),
             "wall_time_s": wall_time_s * frac, "samples_per_s": interval_rate(samples_per_s, e)}
        )  # fmt: skip
    _write_csv(run / "metrics.csv", METRIC_KEYS, metrics)
    diffusion = []
    for u in sorted({1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, drop_update, updates}):
        if u > updates:
            continue
        before = u < drop_update
        d = a + b * math.log(u) if before else a + b * math.log(drop_update) + 0.001 * u
        diffusion.append({"updates": u, "epoch": u / per_epoch, "lr": lr if before else lr / 10,
                          "weight_distance": d})  # fmt: skip
    _write_csv(run / "diffusion.csv", ["updates", "epoch", "lr", "weight_distance"], diffusion)
    summary = {
        "status": "complete", "seed": seed, "model": "f1", "dataset": "fashion-mnist",
        "batch_size": 128 if arm == "SB" else 4096, "base_batch_size": 128,
        "ghost_batch_size": 128 if "GBN" in arm else None,
        "lr_scaling": lr_scaling if "LR" in arm else "none", "regime_adaptation": "RA" in arm,
        "epochs": epochs, "updates": updates, "samples": updates * 100,
        "final_val_error_pct": val_error, "best_val_error_pct": val_error - 0.1,
        "final_train_error_pct": train_error, "wall_time_s": wall_time_s,
        "samples_per_s": updates * 100 / wall_time_s, "device": "cpu",
        "torch_version": "2.13.0+cpu",
        "bigbatch_version": "0.1.0", "git_commit": "abc1234",
    }  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def interval_rate(samples_per_s: float, epoch: int) -> float:
    return samples_per_s * (1.5 if epoch % 2 else 1.0)


REGIME = {"epochs": 5, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9},
                                  {"epoch": 3, "lr": 0.01}, {"epoch": 4, "lr": 0.001}]}  # fmt: skip


def write_grid_toml(grid_dir: Path, paper: dict | None = PAPER, lr_scaling: str = "sqrt",
                    **extra) -> None:  # fmt: skip
    preset = {
        "name": "synthetic-test",
        "description": "numbers written by the test",
        "base": {"model": "f1", "dataset": "fashion-mnist", "base_batch_size": 128,
                 "regime": REGIME},
        "grid": {"seeds": SEEDS, "arms": list(ARMS), "large_batch_size": 4096,
                 "ghost_batch_size": 128, "lr_scaling": lr_scaling},
        **extra,
    }  # fmt: skip
    if paper:
        preset["paper"] = paper
    grid_dir.mkdir(parents=True, exist_ok=True)
    (grid_dir / "grid.toml").write_text(tomli_w.dumps(preset))


# Final validation / training error (%) per arm and seed.
GAP_GRID = {  # LB clearly worse, +LR and +GBN part way, RA closes the gap
    "SB": ([13.0, 13.2, 13.1], [5.0, 5.2, 5.1]),
    "LB": ([17.0, 17.5, 16.9], [9.0, 9.1, 9.2]),
    "LB+LR": ([15.5, 15.2, 15.9], [7.0, 7.0, 7.1]),
    "LB+LR+GBN": ([15.0, 14.8, 15.1], [6.0, 6.3, 6.1]),
    "LB+LR+GBN+RA": ([13.05, 13.15, 12.95], [4.0, 4.2, 4.1]),
}
NO_GAP_GRID = {  # every arm within the seed spread of SB
    "SB": ([13.0, 13.4, 13.2], [5.0, 5.2, 5.1]),
    "LB": ([13.1, 13.3, 13.25], [5.0, 5.1, 5.2]),
    "LB+LR": ([13.2, 13.0, 13.3], [5.0, 5.0, 5.1]),
    "LB+LR+GBN": ([13.1, 13.2, 13.3], [5.0, 5.3, 5.1]),
    "LB+LR+GBN+RA": ([13.0, 13.1, 13.2], [4.0, 4.2, 4.1]),
}
UPDATES = {"SB": 640, "LB": 20, "LB+LR": 20, "LB+LR+GBN": 20, "LB+LR+GBN+RA": 640}
EPOCHS = {"SB": 5, "LB": 5, "LB+LR": 5, "LB+LR+GBN": 5, "LB+LR+GBN+RA": 160}


def make_grid(grid_dir: Path, errors: dict, paper: dict | None = PAPER, lr_scaling: str = "sqrt",
              **extra) -> Path:  # fmt: skip
    write_grid_toml(grid_dir, paper, lr_scaling, **extra)
    for arm, (val, train) in errors.items():
        for seed in SEEDS:
            write_run(
                grid_dir, arm, seed, val_error=val[seed], train_error=train[seed],
                updates=UPDATES[arm], epochs=EPOCHS[arm],
                wall_time_s=10.0 + seed + UPDATES[arm] / 10, samples_per_s=1000.0 + 100 * seed,
                lr_scaling=lr_scaling,
            )  # fmt: skip
    return grid_dir


def _train_throughput(rate: float, epochs: int) -> float:
    """Equal-sized intervals at interval_rate(rate, e): their harmonic mean."""
    return epochs / sum(1 / interval_rate(rate, e) for e in range(1, epochs + 1))


def _text(grid_dir: Path) -> str:
    grid = load_grid(grid_dir)
    rows = arm_rows(grid)
    return " ".join(narrative(grid, rows, {}))


def test_table_values_equal_the_runs(tmp_path):
    grid_dir = make_grid(tmp_path / "g", GAP_GRID)
    rows = {r.arm: r for r in arm_rows(load_grid(grid_dir))}
    assert list(rows) == list(ARMS)
    md_path, html_path = write_report(grid_dir)
    md = md_path.read_text()
    for arm, (val, train) in GAP_GRID.items():
        mean, std = float(np.mean(val)), float(np.std(val, ddof=1))
        row = rows[arm]
        assert row.n_seeds == 3
        assert row.val_error_mean == pytest.approx(mean)
        assert row.val_error_std == pytest.approx(std)
        assert row.train_error_mean == pytest.approx(np.mean(train))
        assert row.best_val_error_mean == pytest.approx(mean - 0.1)
        assert row.updates == UPDATES[arm] and row.epochs == EPOCHS[arm]
        assert row.wall_time_s == pytest.approx(11.0 + UPDATES[arm] / 10)
        # training samples / training time over the intervals (not summary.json's samples / wall)
        per_seed = [_train_throughput(1000.0 + 100 * s, EPOCHS[arm]) for s in SEEDS]
        assert row.train_samples_per_s == pytest.approx(np.mean(per_seed))
        line = next(li for li in md.splitlines() if li.startswith(f"| {arm} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{mean:.2f} ± {std:.2f}"
        assert cells[2] == f"{PAPER[arm]:.2f}"  # the paper's accuracy beside ours
        assert cells[5] == "3" and cells[6] == str(UPDATES[arm]) and cells[7] == str(EPOCHS[arm])
        assert cells[9] == f"{np.mean(per_seed):.0f}"
    assert "val accuracy" not in md  # 100 - error without a spread: dropped
    assert "train samples/s (eval excluded)" in md
    html = html_path.read_text()
    assert "87.80" in html and "paper accuracy %" in html
    assert "The paper reports 87.80 % (SB) and 83.95 % (LB)" in md and "Table 1, recalled" in md


def test_paper_column_absent_without_paper_numbers(tmp_path):
    grid = load_grid(make_grid(tmp_path / "g", GAP_GRID, paper=None))
    header, cells = table_cells(arm_rows(grid))
    assert "paper accuracy %" not in header and len(cells[0]) == len(header) == 9
    assert "The paper reports" not in " ".join(narrative(grid, arm_rows(grid), {}))


def test_paragraph_follows_the_numbers(tmp_path):
    gap = _text(make_grid(tmp_path / "gap", GAP_GRID))
    sb, lb = np.mean(GAP_GRID["SB"][0]), np.mean(GAP_GRID["LB"][0])
    assert f"ends {lb - sb:.2f} points worse than SB" in gap
    assert "a generalization gap" in gap
    assert "LB+LR+GBN+RA closes the gap" in gap
    assert "Arms within SB's seed spread: LB+LR+GBN+RA." in gap
    lr = np.mean(GAP_GRID["LB+LR"][0])
    share = 100 * (lb - lr) / (lb - sb)
    assert (f"LB+LR recovers {share:.0f}% of the gap but still ends {lr - sb:.2f} points worse "
            f"than SB ({lb - lr:.2f} points better than LB)") in gap  # fmt: skip
    assert "LB+LR+GBN recovers" in gap
    assert "points from SB" not in gap and not re.search(r"[+-]\d", gap)  # words, not signs

    none = _text(make_grid(tmp_path / "none", NO_GAP_GRID))
    assert "no clear generalization gap" in none
    assert "closes the gap" not in none and "a generalization gap." not in none


def test_an_arm_equal_to_sb_is_level_not_better(tmp_path):
    errors = {**NO_GAP_GRID, "LB+LR": NO_GAP_GRID["SB"]}
    text = _text(make_grid(tmp_path / "g", errors))
    assert "LB+LR ends level with SB." in text and "0.00 points better" not in text


def test_remedy_below_lb_is_stated_honestly(tmp_path):
    errors = dict(GAP_GRID)
    errors["LB+LR"] = ([40.0, 55.0, 47.0], [38.0, 52.0, 45.0])  # the ×32 demo's +LR collapse
    text = _text(make_grid(tmp_path / "g", errors))
    assert "LB+LR is below LB" in text
    assert "only 20 updates the sqrt-scaled lr 0.1 is unstable" in text
    assert "LB+LR recovers" not in text


def test_a_linear_scaling_grid_is_described_as_linear(tmp_path):
    errors = dict(GAP_GRID)
    errors["LB+LR"] = ([40.0, 55.0, 47.0], [38.0, 52.0, 45.0])
    grid_dir = make_grid(tmp_path / "g", errors, lr_scaling="linear", differences=[])
    md = write_report(grid_dir)[0].read_text()
    assert "only 20 updates the linear-scaled lr 0.1 is unstable" in md
    assert "+LR with linear lr scaling" in md
    for sqrt_rule in ("sqrt-scaled", "sqrt lr", "| sqrt |"):  # no sentence or cell assumes it
        assert sqrt_rule not in md
    line = next(li for li in md.splitlines() if li.startswith("| LB+LR | lr (peak)"))
    assert [c.strip() for c in line.strip("|").split("|")][4:6] == ["3.2", "linear"]  # 0.1 × 32


def test_arm_table_says_what_each_arm_changes(tmp_path):
    grid_dir = make_grid(tmp_path / "g", GAP_GRID)
    md = write_report(grid_dir)[0].read_text()
    table = md.split("## What each arm changes")[1]
    rows = {li.split("|")[1].strip(): [c.strip() for c in li.strip("|").split("|")][1:]
            for li in table.splitlines() if li.startswith("| ") and "---" not in li}  # fmt: skip
    header = rows.pop("arm")
    assert header[1:] == ["batch", "ghost batch", "lr (peak)", "lr scaling", "epochs",
                          "lr drops at epochs", "warm-up epochs", "updates", "samples"]
    assert rows["SB"] == ["—", "128", "none", "0.1", "none", "5", "3, 4", "0", "640", "64000"]
    assert rows["LB"][0] == "batch, updates, samples" and rows["LB"][1] == "4096"
    assert rows["LB+LR"][0] == "lr (peak), lr scaling"
    assert rows["LB+LR"][3] == f"{0.1 * 32 ** 0.5:.4g}"  # sqrt(4096 / 128)
    assert rows["LB+LR+GBN"][:3] == ["ghost batch", "4096", "128"]
    assert rows["LB+LR+GBN+RA"][0] == "epochs, lr drops at epochs, updates, samples"
    assert rows["LB+LR+GBN+RA"][5:7] == ["160", "96, 128"]  # x32, milestones in proportion


def test_missing_and_incomplete_runs_are_reported(tmp_path):
    grid_dir = make_grid(tmp_path / "g", GAP_GRID)
    (grid_dir / "lb" / "seed1" / "summary.json").unlink()  # half-finished run
    for f in (grid_dir / "sb" / "seed2").iterdir():
        f.unlink()
    (grid_dir / "sb" / "seed2").rmdir()  # never started
    md_path, html_path = write_report(grid_dir)
    md = md_path.read_text()
    assert "2 of 15 runs are not complete" in md
    assert "SB seed 2 (missing)" in md and "LB seed 1 (incomplete)" in md
    rows = {r.arm: r for r in arm_rows(load_grid(grid_dir))}
    assert rows["SB"].seeds == [0, 1] and rows["LB"].seeds == [0, 2]
    line = next(li for li in md.splitlines() if li.startswith("| SB |"))
    assert [c.strip() for c in line.strip("|").split("|")][5] == "2/3"  # seeds: 2 of 3 complete
    assert rows["LB"].val_error_mean == pytest.approx(np.mean([17.0, 16.9]))


def test_empty_grid_still_reports(tmp_path):
    write_grid_toml(tmp_path / "g")
    md_path, html_path = write_report(tmp_path / "g")
    assert "15 of 15 runs are not complete" in md_path.read_text()
    assert html_path.is_file()


def test_grid_without_grid_toml_is_inferred_from_directories(tmp_path):
    grid_dir = tmp_path / "g"
    for arm in ("SB", "LB"):
        for seed in (0, 3):
            write_run(grid_dir, arm, seed, val_error=10.0 + seed, train_error=1.0,
                      updates=100, epochs=5)  # fmt: skip
    grid = load_grid(grid_dir)
    assert grid.arms == ["SB", "LB"] and grid.seeds == [0, 3]
    assert not grid.missing_runs()
    # without grid.toml the arm table says what the summaries say, and "—" for the regime
    settings = {s["arm"]: s for s in arm_settings(grid)}
    assert settings["LB"]["batch_size"] == 4096 and settings["LB"]["changes"] == ["batch"]
    assert settings["SB"].get("lr") is None and settings["SB"]["updates"] == 100
    md = write_report(grid_dir)[0].read_text()
    assert "| LB | batch | 4096 | none | — | none | 5 | — | — | 100 | 10000 |" in md


def test_not_a_grid_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a grid directory"):
        write_report(tmp_path / "empty")


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained_and_parses(tmp_path):
    _, html_path = write_report(make_grid(tmp_path / "g", GAP_GRID))
    text = html_path.read_text()
    parser = _Collector()
    parser.feed(text)
    parser.close()
    tags = [t for t, _ in parser.tags]
    assert tags.count("table") == 2  # the results and what each arm changes
    assert tags.count("tr") == 2 * (1 + len(ARMS))
    images = [a for t, a in parser.tags if t == "img"]
    assert len(images) >= 3
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        assert base64.b64decode(attrs["src"][len(prefix) :]).startswith(b"\x89PNG\r\n\x1a\n")
    for _, attrs in parser.tags:
        for key in ("src", "href"):
            assert not str(attrs.get(key, "")).startswith(("http:", "https:", "//"))
    assert "<script" not in text and "<link" not in text and "@import" not in text
    assert all((tmp_path / "g" / "figures" / n).is_file() for n in ("val_error_epochs.png",))


def test_log_fit_recovers_known_diffusion(tmp_path):
    grid_dir = tmp_path / "g"
    for seed in SEEDS:
        write_run(grid_dir, "SB", seed, val_error=13.0, train_error=5.0, updates=640, epochs=5,
                  drop_update=400, a=0.7, b=1.3)  # fmt: skip
    grid = load_grid(grid_dir)
    fit = diffusion_fit(grid, "SB")
    assert fit.end_update == 400  # the first lr drop, as in the paper
    assert fit.log_a == pytest.approx(0.7, abs=1e-6)
    assert fit.log_b == pytest.approx(1.3, abs=1e-6)
    assert fit.log_r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.sqrt_r2 < 0.99  # the contrast fit is visibly worse on logarithmic growth
    text = " ".join(narrative(grid, arm_rows(grid), {"SB": fit}))
    assert "0.7 + 1.3·ln t" in text and "log t fits better" in text


def test_initial_phase_end_handles_warmup_and_constant_lr():
    warm = [{"updates": u, "lr": min(1.0, u / 10) if u < 50 else 0.1} for u in range(1, 80)]
    assert initial_phase_end(warm) == 50
    assert initial_phase_end([{"updates": u, "lr": 0.1} for u in range(1, 10)]) == math.inf


def test_constant_lr_run_is_fitted_over_the_whole_run_and_reported(tmp_path):
    # A regime without an lr drop has no end of the initial phase (inf): the report must say
    # so instead of crashing on int(inf) (found by the reliability kill tests on 1-epoch grids).
    grid_dir = tmp_path / "g"
    write_run(grid_dir, "SB", 0, val_error=13.0, train_error=5.0, updates=300, epochs=1,
              drop_update=301, a=0.5, b=1.1)  # fmt: skip  (after the last update: no drop)
    grid = load_grid(grid_dir)
    fit = diffusion_fit(grid, "SB")
    assert math.isinf(fit.end_update)
    text = " ".join(narrative(grid, arm_rows(grid), {"SB": fit}))
    assert "over the whole run (no lr drop)" in text and "0.5 + 1.1·ln t" in text


def _png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(png)).size


def test_a_long_arm_gets_a_linear_and_a_log_epoch_axis(tmp_path):
    from bigbatch.report import plots

    grid = load_grid(make_grid(tmp_path / "g", GAP_GRID))  # RA trains 32x longer
    both = _png_size(plots.plot_curves(grid, "val_error_pct", "epoch"))
    log_only = _png_size(plots.plot_curves(grid, "val_error_pct", "updates"))
    assert both[0] > 1.8 * log_only[0]  # two panels side by side: linear and log epochs
    short = dict(GAP_GRID)
    del short["LB+LR+GBN+RA"]
    grid = load_grid(make_grid(tmp_path / "short", short))
    assert _png_size(plots.plot_curves(grid, "val_error_pct", "epoch"))[0] < 1.2 * log_only[0]
    for png in (plots.plot_curves(grid, "val_error_pct", "wall_time_s"), plots.plot_losses(grid),
                plots.plot_lr_schedules(grid)):  # fmt: skip
        assert png.startswith(b"\x89PNG")


def test_new_figures_are_none_without_data(tmp_path):
    from bigbatch.report import plots

    write_grid_toml(tmp_path / "g")
    grid = load_grid(tmp_path / "g")
    assert plots.plot_curves(grid, "val_error_pct", "wall_time_s") is None
    assert plots.plot_losses(grid) is None and plots.plot_lr_schedules(grid) is None


def _set_b_simple(grid_dir: Path, arm: str, seed: int, value: float) -> None:
    """Give one run's metrics.csv a ``b_simple`` column of ``value``."""
    path = grid_dir / ARM_SLUGS[arm] / f"seed{seed}" / "metrics.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "b_simple"])
        writer.writeheader()
        writer.writerows({**r, "b_simple": value} for r in rows)


def test_noise_advice_uses_a_measured_seed_and_says_why_when_there_is_none(tmp_path):
    from bigbatch.report.noise import advice_lines

    grid_dir = make_grid(tmp_path / "g", GAP_GRID)
    _set_b_simple(grid_dir, "LB", 1, 500.0)  # seed 0, the first complete run, measured nothing
    _set_b_simple(grid_dir, "LB+LR", 0, -5.0)  # measured, but no positive B_simple
    lines = advice_lines(load_grid(grid_dir))
    assert any(line.startswith("LB (seed 1): B_simple: 500") for line in lines)
    assert [line for line in lines if line.startswith("LB+LR ")] == [
        "LB+LR (seed 0): no advice: no finite, positive B_simple in the series: the noise scale "
        "was not measured, or the run was too short for |G|^2 to come out positive"]
    md = write_report(grid_dir)[0].read_text()  # the whole report is written, advice included
    assert "LB (seed 1): B_simple: 500" in md


@pytest.mark.parametrize("text", ["[1, 2]", '{"status": "compl', ""])
def test_a_summary_that_is_not_a_table_counts_as_unfinished(tmp_path, text):
    grid_dir = make_grid(tmp_path / "g", GAP_GRID)
    (grid_dir / ARM_SLUGS["LB"] / "seed1" / "summary.json").write_text(text)
    grid = load_grid(grid_dir)
    assert grid.runs[("LB", 1)].status == "incomplete"
    assert [r.seed for r in grid.complete_runs("LB")] == [0, 2]
    write_report(grid_dir)  # the report still renders, from the complete seeds
