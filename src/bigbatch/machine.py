"""The machine: what a result came from (named beside every figure), and the device to use."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_name", "resolve_device"]


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows.

    Example:
        >>> isinstance(cpu_name(), str) and len(cpu_name()) > 0
        True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_device(device: Any) -> Any:
    """The ``torch.device`` for a device setting; ``"auto"`` is CUDA when available, else the CPU.

    The one place that decides what ``"auto"`` means (the engine, the loaders, ``torchrun``).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
