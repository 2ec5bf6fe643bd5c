"""Which code runs ghost batch norm: the C kernel, the Triton kernels or the PyTorch ops.

One switch, read at every call: ``BIGBATCH_GBN_BACKEND=auto|c|triton|torch``.

- ``auto`` (the default): the fused C kernel on CPU tensors (``_cpu_kernel.py``), the Triton kernels
  on CUDA tensors (``_triton_kernel.py``) when triton imports and its launch works, the vectorised
  PyTorch ops otherwise.
- ``c``, ``triton``: that kernel wherever it can run; with ``TRITON_INTERPRET=1`` the Triton kernels
  also run on CPU tensors, through Triton's interpreter (slow: for tests).
- ``torch``: always the PyTorch ops.

Under ``torch.compile`` the choice is made when the graph is traced: set the variable before
compiling. Dynamo retraces when a set value changes, but not when an unset variable is set later
(it does not guard on a variable's absence); ``torch._dynamo.reset()`` forces a retrace.

A kernel that cannot run (not installed, not built, an unsupported input, a failed launch) falls
back to the PyTorch ops with one log warning naming the cause; the results are the same. The older
``BIGBATCH_CPU_KERNEL=0`` still switches the C kernel off, with a deprecation warning.
:func:`backend_for` answers "which code would a training-mode call on this tensor run, and why".
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch
from torch import Tensor

from bigbatch.errors import ConfigError
from bigbatch.layers import _cpu_kernel

__all__ = ["BackendChoice", "backend_for", "backend_summary", "requested_backend"]

_LOG = logging.getLogger(__name__)
_CHOICES = ("auto", "c", "triton", "torch")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_warned: set[str] = set()
_failed: dict[str, str] = {}  # device type -> why the Triton launch failed there
_triton_import: str | None = None  # "" once triton imports, else why not


class BackendChoice(NamedTuple):
    """The backend a call runs (``"c"``, ``"triton"`` or ``"torch"``) and why, if it fell back."""

    name: str
    reason: str = ""


def requested_backend() -> str:
    """``BIGBATCH_GBN_BACKEND`` (default ``auto``), checked.

    Raises:
        ConfigError: for a value that is not auto, c, triton or torch.
    """
    value = os.environ.get("BIGBATCH_GBN_BACKEND", "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ConfigError(
            f"BIGBATCH_GBN_BACKEND={value!r} is not a ghost batch norm backend; use one of "
            f"{', '.join(_CHOICES)} (or unset it for auto)"
        )
    return value


def _triton_status() -> str:
    """"" when triton imports (checked once per process), else why it does not."""
    global _triton_import
    if _triton_import is None:
        try:
            from bigbatch.layers import _triton_kernel  # noqa: F401  (imports triton)

            _triton_import = ""
        except ImportError as exc:
            _triton_import = f"triton is not importable ({exc}); pip install triton"
    return _triton_import


# torch.compile takes _triton_status() as a constant (its first call imports a module). This is
# what @torch.compiler.assume_constant_result does in torch 2.13, without the decorator's import of
# torch._dynamo, which took `import bigbatch.layers` from 0.01 s to 1.2 s. (The CPU compile tests
# pass without the mark too; a later torch that reads another one would only trace the function.)
_triton_status._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _legacy_cpu_switch_off() -> bool:
    value = os.environ.get("BIGBATCH_CPU_KERNEL")
    if value is None:
        return False
    _log_once("BIGBATCH_CPU_KERNEL is deprecated; use BIGBATCH_GBN_BACKEND=torch (or c) instead")
    return value.strip().lower() in ("0", "false", "no", "off")


def _dtype_reason(x: Tensor) -> str:
    if x.dtype in _KERNEL_DTYPES:
        return ""
    return f"{x.dtype} input (the kernels take float16, bfloat16, float32 and float64)"


def _c_choice(x: Tensor) -> BackendChoice:
    if torch.compiler.is_compiling():
        return BackendChoice("torch", "torch.compile traces the PyTorch ops, not the C kernel")
    reason = _dtype_reason(x)
    if not reason and x.device.type != "cpu":
        reason = f"the C kernel runs on CPU tensors, not {x.device.type}"
    if not reason and type(x) is not torch.Tensor:
        reason = f"a {type(x).__name__}, not a plain tensor"
    if not reason and _legacy_cpu_switch_off():
        reason = "BIGBATCH_CPU_KERNEL=0"
    if not reason and _cpu_kernel._suspended:
        reason = "inside _cpu_kernel.disabled()"
    if not reason and not _cpu_kernel.available():
        reason = _cpu_kernel.status()
    return BackendChoice("torch", reason) if reason else BackendChoice("c")


def _triton_choice(x: Tensor) -> BackendChoice:
    reason = _dtype_reason(x) or _triton_status()
    device = x.device.type
    if not reason and device == "cpu" and not _interpreting():
        reason = "Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if not reason and device not in ("cpu", "cuda"):
        reason = f"Triton runs on CUDA tensors, not {device}"
    if not reason and not torch.compiler.is_compiling() and type(x) is not torch.Tensor:
        reason = f"a {type(x).__name__}, not a plain tensor"
    if not reason:
        reason = _failed.get(device, "")
    return BackendChoice("torch", reason) if reason else BackendChoice("triton")


def choose(x: Tensor) -> BackendChoice:
    """The backend for a training-mode call on ``x`` (see :func:`backend_for`), without warning."""
    wanted = requested_backend()
    if wanted == "torch":
        return BackendChoice("torch")
    if torch.jit.is_tracing():
        return BackendChoice("torch", "torch.jit.trace records the PyTorch ops, not a kernel")
    if wanted == "c" or (wanted == "auto" and x.device.type == "cpu"):
        return _c_choice(x)
    if wanted == "triton" or (wanted == "auto" and x.device.type == "cuda"):
        return _triton_choice(x)
    return BackendChoice("torch", f"no ghost batch norm kernel for {x.device.type} tensors")


def _log_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _LOG.warning("bigbatch: %s", message)


# No warning: fallbacks the user asked for, where no kernel was ever expected, or where the C
# kernel's loader has already warned (a failed build) or stays silent by design (not Linux).
_QUIET = (
    "torch.jit.trace",
    "inside _cpu_kernel.disabled()",
    "BIGBATCH_CPU_KERNEL=0",
    "no ghost batch norm kernel",
    "ghost batch norm CPU kernel:",
)


def warn_fallback(choice: BackendChoice) -> None:
    """Log, once per cause, that a kernel was asked for or expected and the ops run instead."""
    if choice.name == "torch" and choice.reason and not choice.reason.startswith(_QUIET):
        _log_once(
            f"ghost batch norm falls back to the PyTorch ops: {choice.reason} (same results, "
            f"slower; BIGBATCH_GBN_BACKEND=torch silences this)"
        )


def launch_failed(device_type: str, exc: Exception) -> None:
    """Record that a Triton launch failed on ``device_type``: later calls there use the ops."""
    reason = f"the Triton launch failed on {device_type} ({type(exc).__name__}: {exc})"
    _failed[device_type] = reason.splitlines()[0][:300]
    warn_fallback(BackendChoice("torch", _failed[device_type]))


def backend_for(x: Tensor) -> BackendChoice:
    """The backend a training-mode ghost batch norm call on ``x`` would run now, and why.

    Args:
        x: an input of the layer (only its device, dtype and type matter).

    Returns:
        ``BackendChoice(name, reason)``: ``name`` is ``"c"``, ``"triton"`` or ``"torch"``;
        ``reason`` says why a kernel is not used ("" when the choice is not a fallback).

    Raises:
        ConfigError: for a bad ``BIGBATCH_GBN_BACKEND``.

    Example:
        >>> backend_for(torch.ones(4, 2)).name in ("c", "torch")
        True
    """
    return choose(x)


def backend_summary(device: torch.device | str) -> str:
    """One line for a run's summary: the backend a float32 tensor on ``device`` gets, and why."""
    choice = choose(torch.empty(0, device=device))
    line = choice.name
    if choice.name == "c":
        line += f" ({_cpu_kernel.status()})"
    elif choice.reason:
        line += f" ({choice.reason})"
    return line
