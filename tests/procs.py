"""Helpers for the multi-process tests: a free loopback port, and a bounded 2-process spawn."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

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
