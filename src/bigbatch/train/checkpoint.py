"""Atomic file writes and checkpoints that load with ``torch.load(weights_only=True)``.

Every file the engine writes goes through :func:`bigbatch.fileio.atomic_write_bytes` (temp file,
fsync, ``os.replace``), so a crash (or SIGKILL) at any moment leaves either the
old file or the new one, never half of each, and ``last.pt`` is always loadable.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no pickled classes,
unlike an argparse Namespace), which is what ``weights_only=True`` accepts.

Example:
    >>> import tempfile, torch
    >>> d = Path(tempfile.mkdtemp())
    >>> save_checkpoint(d / "last.pt", {"updates": 3, "w": torch.ones(2)})
    >>> load_checkpoint(d / "last.pt")["updates"]
    3
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bigbatch.errors import BigBatchError
from bigbatch.fileio import atomic_write_bytes

__all__ = ["CheckpointError", "checkpoint_bytes", "load_checkpoint", "save_checkpoint"]


class CheckpointError(BigBatchError, ValueError):
    """A checkpoint is missing, unreadable or not a bigbatch checkpoint."""


def _check_plain(obj: Any, where: str = "checkpoint") -> None:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(
                    f"{where}: key {k!r} must be a str or int for a weights_only checkpoint"
                )
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str, torch.dtype))):
        raise TypeError(
            f"{where} holds a {type(obj).__name__}; checkpoints hold only tensors, numbers, "
            "strings, lists and dicts so that torch.load(weights_only=True) can read them"
        )


def checkpoint_bytes(state: Mapping[str, Any]) -> bytes:
    """Serialise a plain-dict checkpoint (checked to be ``weights_only``-loadable) to bytes."""
    _check_plain(state)
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    return buf.getvalue()


def save_checkpoint(path: str | Path, state: Mapping[str, Any] | bytes) -> None:
    """Atomically save a checkpoint dict (or bytes from :func:`checkpoint_bytes`) to ``path``."""
    data = state if isinstance(state, bytes) else checkpoint_bytes(state)
    atomic_write_bytes(path, data)


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: the file is missing or cannot be read as a plain-dict checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a corrupt/unsafe file
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot load checkpoint {str(path)!r}: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} is not a bigbatch checkpoint (not a dict)")
    return state
