"""Atomic writes, weights_only checkpoints, and metrics files that survive a kill and a resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bigbatch import fileio
from bigbatch.train.checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    atomic_write_json,
    load_checkpoint,
    save_checkpoint,
)
from bigbatch.train.metrics import MetricsLogger, read_rows, truncate_rows


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]
    atomic_write_json(tmp_path / "s.json", {"a": 1.5})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 1.5}


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_write_bytes(path, b"good")

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(path, b"half")
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # temp file removed


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    atomic_write_bytes(tmp_path / "x", b"data")
    assert len(synced) == 2  # the file, then the directory


def test_checkpoints_load_with_weights_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()}, "updates": 3, "best": float("inf"),
        "config": {"model": "f1", "ghost_batch_size": None, "list": [1, 2.5, "x"]},
    }
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    assert loaded["updates"] == 3 and loaded["config"] == state["config"]
    torch.testing.assert_close(loaded["model"]["0.weight"], model[0].weight)
    again = load_checkpoint(tmp_path / "c.pt")
    opt.load_state_dict(again["optimizer"])


def test_non_plain_objects_are_refused_before_writing(tmp_path):
    import argparse

    with pytest.raises(TypeError, match=r"checkpoint\['args'\] holds a Namespace"):
        save_checkpoint(tmp_path / "c.pt", {"args": argparse.Namespace(lr=0.1)})
    assert not (tmp_path / "c.pt").exists()


def test_load_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_metrics_logger_writes_identical_keys_to_csv_and_jsonl(tmp_path):
    log = MetricsLogger(tmp_path, "metrics", tensorboard=False)
    rows = [{"updates": u, "val_loss": 1.0 / u, "lr": 0.1} for u in (1, 2, 3)]
    for row in rows:
        log.write(row)
    log.close()
    assert read_rows(tmp_path / "metrics.csv") == rows == read_rows(tmp_path / "metrics.jsonl")


def test_csv_columns_are_fixed_by_the_first_row(tmp_path):
    log = MetricsLogger(tmp_path, "m", tensorboard=False)
    log.write({"updates": 1, "a": 1.0})
    with pytest.raises(ValueError, match=r"lacks columns \['a'\]"):
        log.write({"updates": 2})
    log.close()


def test_truncate_rows_drops_rows_after_the_checkpoint_and_partial_lines(tmp_path):
    log = MetricsLogger(tmp_path, "metrics", tensorboard=False)
    for u in (4, 8, 12):
        log.write({"updates": u, "x": float(u)})
    log.close()
    for suffix in (".csv", ".jsonl"):
        with open(tmp_path / f"metrics{suffix}", "a") as f:
            f.write("16,1" if suffix == ".csv" else '{"updates": 16, "x"')  # killed mid-write
    assert truncate_rows(tmp_path / "metrics.csv", 8) == 2
    assert truncate_rows(tmp_path / "metrics.jsonl", 8) == 2
    expected = [{"updates": 4, "x": 4.0}, {"updates": 8, "x": 8.0}]
    assert read_rows(tmp_path / "metrics.csv") == expected == read_rows(tmp_path / "metrics.jsonl")
    # appending after a truncation continues the same file with the same header
    log = MetricsLogger(tmp_path, "metrics", tensorboard=False)
    log.write({"updates": 12, "x": 12.0})
    log.close()
    assert [r["updates"] for r in read_rows(tmp_path / "metrics.csv")] == [4, 8, 12]
    assert truncate_rows(tmp_path / "absent.csv", 3) == 0


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644
