"""Atomic writes: temp file, fsync, rename; a failed write keeps the old file."""

from __future__ import annotations

import json
import os

import pytest

from bigbatch import fileio
from bigbatch.fileio import atomic_write_bytes, atomic_write_json, remove_stale_temp_files


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


def test_atomic_writes_get_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".metrics.csv.abc123.tmp", tmp_path / "checkpoints" / ".last.pt.x.tmp"]
    keep = [tmp_path / "metrics.csv", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in stale + keep:
        path.write_text("x")
    with caplog.at_level("INFO", logger="bigbatch"):
        removed = remove_stale_temp_files(tmp_path, tmp_path / "checkpoints")
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert sum("left by an interrupted write" in r.getMessage() for r in caplog.records) == 2
