"""Kill a real `bigbatch train` process (SIGKILL) mid-run, resume it, compare with a full run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from procs import kill_after_two_evaluations

from bigbatch.train.metrics import read_rows

# 2048 synthetic samples at batch 32: 64 updates per epoch, 2 epochs, an evaluation every 16.
ARGS = ["--model", "f1", "--model-option", "hidden=32", "--model-option", "depth=2",
        "--dataset", "synthetic", "--batch-size", "32", "--ghost-batch-size", "16", "--epochs", "2",
        "--eval-every", "16", "--clip", "5", "--seed", "3", "--device", "cpu", "--progress", "log"]
TIMING_KEYS = {"wall_time_s", "samples_per_s", "train_time_s", "train_samples_per_s"}


def _env() -> dict[str, str]:
    # One thread in every process: float sums happen in the same order, and the two runs that go
    # side by side do not fight over the cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _bigbatch(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bigbatch", "train", *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = _bigbatch(*ARGS, "--out", str(full))

    kill_after_two_evaluations(_bigbatch(*ARGS, "--out", str(killed)), killed)
    rows_at_kill = read_rows(killed / "metrics.csv")
    assert not (killed / "summary.json").exists()  # really killed mid-run
    assert len(rows_at_kill) < 8

    # the checkpoint left behind is a plain dict
    state = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert state["updates"] >= 16 and "rng" in state and "weight_distance" in state

    resumed = _bigbatch("--resume", str(killed), "--progress", "none")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err

    a, b = read_rows(full / "metrics.csv"), read_rows(killed / "metrics.csv")
    assert [r["updates"] for r in a] == [16 * k for k in range(1, 9)]
    assert _without_timing(b) == _without_timing(a)  # identical, bit for bit
    assert read_rows(killed / "metrics.jsonl") == b  # CSV and JSONL agree after the truncation
    da, db = read_rows(full / "diffusion.jsonl"), read_rows(killed / "diffusion.jsonl")
    assert db == da
    # negative control: the comparison would see a difference between evaluations
    assert a[0]["val_loss"] != a[1]["val_loss"]
    assert a[0]["weight_distance"] != a[1]["weight_distance"]

    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((killed / "summary.json").read_text())
    for key in ("final_val_error_pct", "best_val_error_pct", "final_train_error_pct", "updates",
                "samples", "final_weight_distance"):
        assert sa[key] == sb[key], key
