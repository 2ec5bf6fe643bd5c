"""Helpers for the multi-process tests: a free loopback port, and a bounded 2-process spawn."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(worker: Callable, args: tuple, nprocs: int, timeout_s: float = 120) -> None:
    """``mp.spawn(worker, args, nprocs)``; kill the workers and fail after ``timeout_s``."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs}-process job did not finish within {timeout_s:.0f} s")


def kill_after_two_evaluations(victim: subprocess.Popen, run_dir: Path,
                               timeout_s: float = 120) -> None:
    """SIGKILL ``victim`` (a ``bigbatch train`` process) once ``run_dir`` has a checkpoint and two
    metrics rows; fail if it ends first or takes longer than ``timeout_s``."""
    from bigbatch.train.metrics import read_rows

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (run_dir / "checkpoints" / "last.pt").exists() \
                and len(read_rows(run_dir / "metrics.csv")) >= 2:
            break
        if victim.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {victim.communicate()[1]}")
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
