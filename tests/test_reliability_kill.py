"""Kill anywhere, lose nothing: real processes killed with SIGKILL at seeded random points resume to
the metrics of an uninterrupted run, and no file in the run dir is ever half-written.

The window of a checkpoint write is microseconds on a small model, so the third kill sets
``BIGBATCH_TEST_WRITE_DELAY_S`` (documented in bigbatch.train.checkpoint): every atomic write
sleeps between writing its temporary file and renaming it, and the test kills while a
``.last.pt.*.tmp`` file is present.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
import torch

from bigbatch.train.metrics import read_rows

KILL_SEED = 2026  # the kill points are random, but the same on every run of the test
# 2048 synthetic samples at batch 32: 64 updates an epoch, 2 epochs, an evaluation every 16.
ARGS = ["--model", "f1", "--model-option", "hidden=16", "--model-option", "depth=2",
        "--dataset", "synthetic", "--batch-size", "32", "--epochs", "2", "--eval-every", "16",
        "--device", "cpu", "--progress", "log"]
TIMING = {"wall_time_s", "samples_per_s", "train_time_s", "train_samples_per_s"}
SUMMARY_KEYS = ("final_val_error_pct", "best_val_error_pct", "final_train_error_pct", "updates",
                "samples", "final_weight_distance", "skipped_steps")


def _start(*args: str, delay_writes: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("BIGBATCH_TEST_WRITE_DELAY_S", None)
    if delay_writes is not None:
        env["BIGBATCH_TEST_WRITE_DELAY_S"] = str(delay_writes)
    return subprocess.Popen([sys.executable, "-m", "bigbatch", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _finish(proc: subprocess.Popen, timeout: float = 300) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _rows_written(run: Path) -> int:
    try:
        return max(0, (run / "metrics.csv").read_text().count("\n") - 1)
    except FileNotFoundError:
        return 0


def _temp_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob(".*.tmp"))


def _assert_nothing_half_written(run: Path) -> None:
    """Every file a reader opens is whole: config.toml parses, last.pt/best.pt load weights-only,
    every JSONL line but an append cut by the kill parses (resume drops that line)."""
    if (run / "config.toml").exists():
        tomllib.loads((run / "config.toml").read_text())
    for name in ("last.pt", "best.pt"):
        if (run / "checkpoints" / name).exists():
            state = torch.load(run / "checkpoints" / name, weights_only=True)
            assert state["format"] == "bigbatch-checkpoint-v1"
    for name in ("metrics.jsonl", "diffusion.jsonl"):
        if (run / name).exists():
            lines = (run / name).read_text().split("\n")
            for line in lines[:-1]:  # complete lines (each ends in a newline)
                json.loads(line)
    assert not (run / "summary.json").exists()


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_same_run(a: Path, b: Path) -> None:
    ra, rb = read_rows(a / "metrics.jsonl"), read_rows(b / "metrics.jsonl")
    assert len(ra) == 8 and _without_timing(rb) == _without_timing(ra)  # bit for bit
    assert _without_timing(read_rows(b / "metrics.csv")) == _without_timing(ra)
    assert read_rows(b / "diffusion.jsonl") == read_rows(a / "diffusion.jsonl")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sb["status"] == "complete"
    for key in SUMMARY_KEYS:
        assert sa[key] == sb[key], key


@pytest.mark.slow
def test_three_kills_early_mid_and_during_a_checkpoint_write(tmp_path):
    rng = random.Random(KILL_SEED)
    full, other, run = tmp_path / "full", tmp_path / "other-seed", tmp_path / "killed"
    reference = _start("train", *ARGS, "--seed", "3", "--out", str(full))
    control = _start("train", *ARGS, "--seed", "4", "--out", str(other))

    # 1. early: training has started (config.toml written), no or few checkpoints yet
    proc = _start("train", *ARGS, "--seed", "3", "--out", str(run))
    _wait_for(proc, (run / "config.toml").exists, "config.toml")
    time.sleep(rng.uniform(0.0, 0.05))
    _kill(proc)
    _assert_nothing_half_written(run)

    # 2. mid-training, after a random number of evaluations
    target = rng.randint(_rows_written(run) + 1, 5)
    proc = _start("train", "--resume", str(run))
    _wait_for(proc, lambda: _rows_written(run) >= target, f"{target} evaluations")
    _kill(proc)
    _assert_nothing_half_written(run)
    rows_at_kill = _rows_written(run)

    # 3. during a checkpoint write: a temp file of last.pt exists when the kill lands
    proc = _start("train", "--resume", str(run), delay_writes=0.15)
    after = rng.randint(rows_at_kill, 7)
    _wait_for(
        proc,
        lambda: _rows_written(run) >= after and bool(_temp_files(run / "checkpoints")),
        "a checkpoint write",
    )
    _kill(proc)
    stray = _temp_files(run / "checkpoints")
    assert stray and stray[0].name.startswith(".last.pt.")  # killed mid-write, really
    _assert_nothing_half_written(run)  # last.pt is still the previous, whole checkpoint

    # 4. resume to the end: the stray temp file is cleaned, the result is the uninterrupted one
    _finish(_start("train", "--resume", str(run)))
    assert _temp_files(run) == []
    _finish(reference)
    _finish(control)
    _assert_same_run(full, run)
    # negative control: another seed gives other metrics, so the comparison can fail
    a, c = read_rows(full / "metrics.jsonl"), read_rows(other / "metrics.jsonl")
    assert [r["val_loss"] for r in a] != [r["val_loss"] for r in c]
    assert a[-1]["weight_distance"] != c[-1]["weight_distance"]


MINI_PRESET = """
name = "mini"
[base]
model = "f1"
model_options = { hidden = 16, depth = 2 }
dataset = "synthetic"
base_batch_size = 64
eval_batch_size = 512
[base.regime]
epochs = 2
phases = [{ epoch = 0, lr = 0.1, momentum = 0.9 }, { epoch = 1, lr = 0.01 }]
[grid]
seeds = [0]
large_batch_size = 256
ghost_batch_size = 64
arms = ["SB", "LB"]
"""


@pytest.mark.slow
def test_reproduce_killed_in_training_and_in_the_report_finishes_the_same(tmp_path):
    rng = random.Random(KILL_SEED + 1)
    preset = tmp_path / "mini.toml"
    preset.write_text(MINI_PRESET)
    full, grid = tmp_path / "full", tmp_path / "grid"

    def reproduce(out: Path) -> subprocess.Popen:
        return _start("reproduce", "--preset", str(preset), "--out", str(out), "--device", "cpu")

    reference = reproduce(full)
    # 1. killed while the first run trains (after its first checkpoint)
    proc = reproduce(grid)
    _wait_for(proc, (grid / "sb" / "seed0" / "checkpoints" / "last.pt").exists, "a checkpoint")
    time.sleep(rng.uniform(0.0, 0.05))
    _kill(proc)
    assert not (grid / "report.md").exists()
    # 2. re-run, killed while the report is written (every run done, report.html not yet there)
    proc = reproduce(grid)
    _wait_for(proc, (grid / "lb" / "seed0" / "summary.json").exists, "the last run to finish")
    time.sleep(rng.uniform(0.0, 0.3))
    _kill(proc)
    assert not (grid / "report.html").exists(), "the kill came after the report"
    done = {p: p.stat().st_mtime_ns for p in grid.glob("*/seed0/summary.json")}
    assert len(done) == 2
    # 3. re-run: no run trains again, the report is written, no temp file is left anywhere
    _finish(reproduce(grid))
    _finish(reference)
    assert {p: p.stat().st_mtime_ns for p in grid.glob("*/seed0/summary.json")} == done
    assert (grid / "report.md").is_file() and (grid / "report.html").stat().st_size > 1000
    assert _temp_files(grid) == []
    for arm in ("sb", "lb"):
        a, b = full / arm / "seed0", grid / arm / "seed0"
        assert _without_timing(read_rows(b / "metrics.jsonl")) == _without_timing(
            read_rows(a / "metrics.jsonl"))
        sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
        for key in SUMMARY_KEYS:
            assert sa[key] == sb[key], (arm, key)
    # negative control: the two arms' results differ, so the comparison can fail
    assert read_rows(full / "sb" / "seed0" / "metrics.jsonl")[-1]["val_loss"] != read_rows(
        full / "lb" / "seed0" / "metrics.jsonl")[-1]["val_loss"]
