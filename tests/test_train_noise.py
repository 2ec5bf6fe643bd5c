"""The engine's --noise-scale and lr_scaling="adascale": the sources agree with the one-process
estimate, measuring changes no numerics, AdaScale's progress ends the run at the small-batch
number of updates, and a killed run resumes every running average exactly."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from procs import free_port, kill_after_two_evaluations, spawn_and_wait

from bigbatch import distributed
from bigbatch.diagnostics import estimate_noise_scale
from bigbatch.errors import ConfigError
from bigbatch.recipes import Regime
from bigbatch.train import RunConfig, train
from bigbatch.train.build import build_run
from bigbatch.train.metrics import read_rows
from bigbatch.train.noise import NOISE_COLUMNS

BASE = {"model": "f1", "model_options": {"hidden": 16, "depth": 2}, "dataset": "synthetic",
        "device": "cpu", "seed": 1, "progress": "none", "log_diffusion": False}
TIMING_KEYS = {"wall_time_s", "samples_per_s"}


def _first_update_estimate(config: RunConfig, small_batch_size: int, tmp_path: Path):
    """``estimate_noise_scale`` at the run's initial weights on its first global batch."""
    ctx = distributed.setup("cpu")
    run = build_run(config, ctx, tmp_path / "reference")
    x, y = next(iter(run.train_loader.iterate(0)))
    return estimate_noise_scale(run.state.model.train(), F.cross_entropy, [(x, y)],
                                small_batch_size)


def _measured(run_dir: Path) -> dict:
    """The run's noise-scale state from its last checkpoint: (|G|^2, tr Sigma) running means."""
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["noise_scale"]
    return {"grad_sq_norm": state["grad_sq"] / state["weight"],
            "trace_sigma": state["trace"] / state["weight"], "num_updates": state["num_updates"]}


# Decay 1 keeps the plain mean; measuring every 1000th update measures the first one only.
FIRST_ONLY = {"noise_scale": True, "noise_scale_decay": 1.0, "noise_scale_every": 1000}


def test_micro_batch_source_matches_the_one_process_estimate(tmp_path):
    config = RunConfig(**BASE, batch_size=256, micro_batch_size=64, epochs=1, **FIRST_ONLY)
    train(config, tmp_path / "run")
    measured = _measured(tmp_path / "run")
    expected = _first_update_estimate(config, 64, tmp_path)
    assert measured["num_updates"] == 1
    assert measured["grad_sq_norm"] == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert measured["trace_sigma"] == pytest.approx(expected.trace_sigma, rel=1e-4)
    assert expected.trace_sigma > 0 and expected.grad_sq_norm > 0  # a real signal


def _ddp_worker(rank: int, port: int, out_dir: str, config: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(RunConfig(**config), Path(out_dir) / "run")


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("changes", "small", "other"),
    [
        # No micro-batches: each process's local gradient (64 samples) is the small batch.
        ({"batch_size": 128}, 64, None),
        # Micro-batches win over the processes: 2 x 128 per process, each split into 2 x 64. The
        # hooks see each micro-batch's local gradient before DDP's all-reduce, and the squared
        # norms are averaged over processes: the four 64-sample batches of one process with them.
        # The per-process (128-sample) estimate differs, so the test sees which one was used.
        ({"batch_size": 256, "micro_batch_size": 64}, 64, 128),
    ],
    ids=["processes", "processes-and-micro-batches"],
)
def test_two_process_sources_match_the_one_process_estimate(tmp_path, changes, small, other):
    config = {**BASE, **changes, "epochs": 1, **FIRST_ONLY}
    spawn_and_wait(_ddp_worker, (free_port(), str(tmp_path), config), 2, timeout_s=120)
    measured = _measured(tmp_path / "run")
    expected = _first_update_estimate(RunConfig(**config), small, tmp_path)
    assert measured["num_updates"] == 1
    assert measured["grad_sq_norm"] == pytest.approx(expected.grad_sq_norm, rel=1e-4)
    assert measured["trace_sigma"] == pytest.approx(expected.trace_sigma, rel=1e-4)
    if other is not None:
        wrong = _first_update_estimate(RunConfig(**config), other, tmp_path / "other")
        assert measured["trace_sigma"] != pytest.approx(wrong.trace_sigma, rel=0.05)


def _rows(run_dir: Path, drop=()) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS | set(drop)}
            for r in read_rows(run_dir / "metrics.csv")]


def test_measuring_changes_no_numerics_and_fills_the_columns(tmp_path):
    common = {**BASE, "batch_size": 256, "micro_batch_size": 64, "epochs": 2, "eval_every": 2}
    train(RunConfig(**common), tmp_path / "off")
    train(RunConfig(**common, noise_scale=True, noise_scale_every=3), tmp_path / "on")
    off, on = _rows(tmp_path / "off"), _rows(tmp_path / "on")
    assert [k for k in off[0] if k in NOISE_COLUMNS] == list(NOISE_COLUMNS)  # always present
    assert all(r[k] is None for r in off for k in NOISE_COLUMNS)  # empty when off
    assert _rows(tmp_path / "on", NOISE_COLUMNS) == _rows(tmp_path / "off", NOISE_COLUMNS)
    assert all(isinstance(r["b_simple"], float) and r["b_simple"] > 0 for r in on)
    assert all(r["adascale_gain"] is None for r in on)  # no AdaScale in this run
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["noise_scale_measurements"] == math.ceil(16 / 3)  # updates 1, 4, 7, ... 16


def test_no_small_batch_is_one_line_and_adascale_refuses(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="bigbatch.train"):
        train(RunConfig(**BASE, batch_size=256, epochs=1, noise_scale=True), tmp_path / "a")
    lines = [r.getMessage() for r in caplog.records if "--noise-scale" in r.getMessage()]
    assert len(lines) == 1 and "--micro-batch-size" in lines[0]
    assert all(r["b_simple"] is None for r in _rows(tmp_path / "a"))
    with pytest.raises(ConfigError, match="micro-batch-size"):
        train(RunConfig(**BASE, batch_size=256, epochs=1, noise_scale=True,
                        lr_scaling="adascale"), tmp_path / "b")


@pytest.mark.parametrize(("changes", "message"), [
    ({"lr_scaling": "adascale"}, "add --noise-scale"),
    ({"lr_scaling": "adascale", "noise_scale": True, "regime_adaptation": True},
     "drop regime_adaptation"),
    ({"lr_scaling": "adascale", "noise_scale": True, "warmup_epochs": 1.0}, "base regime"),
    ({"lr_scaling": "adascale", "noise_scale": True, "batch_size": 64}, ">= base_batch_size"),
    ({"noise_scale_decay": 1.5}, r"in \[0, 1\]"),
])
def test_config_refuses_inconsistent_noise_keys(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**{**BASE, "batch_size": 256, **changes})


ADASCALE = {**BASE, "batch_size": 256, "micro_batch_size": 32, "base_batch_size": 32,
            "epochs": 2, "eval_every": 2, "noise_scale": True, "noise_scale_every": 1,
            "noise_scale_decay": 0.9, "lr_scaling": "adascale"}


def test_adascale_ends_the_run_at_the_small_batch_number_of_updates(tmp_path):
    small = train(RunConfig(**{**ADASCALE, "batch_size": 32, "micro_batch_size": None,
                               "noise_scale": False, "lr_scaling": "none"}), tmp_path / "sb")
    summary = train(RunConfig(**ADASCALE), tmp_path / "as")
    assert summary["adascale_total_tau"] == small["updates"] == 128  # 2048 samples / 32, 2 epochs
    tau, gain = summary["adascale_tau"], summary["adascale_final_gain"]
    assert tau >= 128 > tau - gain  # the update that reached the target was the last
    # Some noise: more progress per update than 1, less than S = 8; so fewer updates than +RA.
    assert 128 / 8 <= summary["updates"] < 128
    rows = read_rows(tmp_path / "as" / "metrics.csv")
    regime = Regime.from_dict(RunConfig(**ADASCALE).regime or _default_regime())
    for row in rows:  # the lr of the row's update: gain x base lr at the progress before it
        before = (row["adascale_tau"] - row["adascale_gain"]) / 64  # 64 small updates per epoch
        base_lr = regime.with_epochs(2).settings_at(before)["lr"]
        assert row["lr"] == pytest.approx(row["adascale_gain"] * base_lr, rel=1e-12)
        assert 1.0 <= row["adascale_gain"] <= 8.0


def _default_regime() -> dict:
    from bigbatch import models

    return dict(models.get_spec("f1").default_regime)


# -- kill and resume ------------------------------------------------------------------------------
KILL_ARGS = ["--model", "f1", "--model-option", "hidden=32", "--model-option", "depth=2",
             "--dataset", "synthetic", "--batch-size", "128", "--micro-batch-size", "32",
             "--base-batch-size", "32", "--epochs", "4", "--eval-every", "4", "--seed", "3",
             "--device", "cpu", "--progress", "log", "--noise-scale", "--noise-scale-every", "2",
             "--lr-scaling", "adascale"]


def _bigbatch(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "bigbatch", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_run(run_dir: Path) -> None:
    kill_after_two_evaluations(_bigbatch(*KILL_ARGS, "--out", str(run_dir)), run_dir)
    assert not (run_dir / "summary.json").exists()  # really killed mid-run


@pytest.mark.slow
def test_a_killed_adascale_run_resumes_every_running_average_exactly(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    uninterrupted = _bigbatch(*KILL_ARGS, "--out", str(full))
    _kill_mid_run(killed)
    at_kill = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert at_kill["noise_scale"]["num_updates"] > 0 and at_kill["adascale"]["tau"] > 0
    resumed = _bigbatch("--resume", str(killed), "--progress", "none")
    for process in (resumed, uninterrupted):
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    a, b = _rows(full), _rows(killed)
    assert b == a  # bit for bit, the noise columns and AdaScale's gain and progress included
    assert a[0]["b_simple"] != a[-1]["b_simple"]  # negative control: the averages move
    last_a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    last_b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert last_b["noise_scale"] == last_a["noise_scale"]
    assert last_b["adascale"] == last_a["adascale"]
    assert at_kill["updates"] < last_a["updates"]
