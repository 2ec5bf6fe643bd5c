"""Atomic file writes and checkpoints that load with ``torch.load(weights_only=True)``.

Every file the engine writes goes through :func:`atomic_write_bytes`: the data goes to a temporary
file in the same directory, is flushed and fsynced, then ``os.replace``-d over the target, and the
directory is fsynced. A crash (or SIGKILL) at any moment leaves either the old file or the new one,
never half of each, so ``last.pt`` is always loadable.

A write that fails (disk full, read-only filesystem, a directory where the file should go) raises
:class:`StorageError`, a one-line ``BigBatchError`` naming the path ("no space left on device
writing ..."); the previous file is intact and the temporary file removed. A process killed
mid-write leaves a stray ``.NAME.*.tmp`` file: readers never look at it, and
:func:`remove_stale_temp_files` (called on resume) deletes it.

Fault injection for tests: when the environment variable ``BIGBATCH_TEST_WRITE_DELAY_S`` is set,
every atomic write sleeps that many seconds after writing the temporary file and before renaming
it, widening the "killed during a checkpoint write" window from microseconds to something a test
can hit (``tests/test_reliability_kill.py``). Unset, it costs one dict lookup per write.

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

import errno
import io
import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from bigbatch.errors import BigBatchError

__all__ = [
    "CheckpointError",
    "StorageError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "checkpoint_bytes",
    "load_checkpoint",
    "remove_stale_temp_files",
    "save_checkpoint",
    "storage_error",
]

TEMP_PATTERN = ".*.tmp"  # what atomic_write_bytes names its temporary files (mkstemp below)
_WRITE_DELAY_ENV = "BIGBATCH_TEST_WRITE_DELAY_S"


class CheckpointError(BigBatchError, ValueError):
    """A checkpoint is missing, unreadable or not a bigbatch checkpoint."""


class StorageError(BigBatchError, OSError):
    """Writing an output file failed (disk full, permissions, read-only filesystem)."""


def storage_error(exc: OSError, path: str | Path) -> StorageError:
    """A one-line :class:`StorageError` for ``exc`` raised while writing ``path``."""
    if exc.errno == errno.ENOSPC:
        what = "no space left on device"
    elif exc.errno == errno.EDQUOT:
        what = "disk quota exceeded"
    else:
        what = exc.strerror or str(exc) or type(exc).__name__
    error = StorageError(f"{what} writing {str(path)!r}; the previous file is unchanged")
    error.errno = exc.errno
    return error


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files left in ``directory`` by a write that was killed; returns them.

    Only names that :func:`atomic_write_bytes` creates (``.NAME.XXXX.tmp``) are touched. Call it
    when no other process writes to ``directory`` (on resume).
    """
    removed = []
    for path in Path(directory).glob(TEMP_PATTERN):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not possible on every platform/filesystem (e.g. Windows).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, ``os.replace``).

    Raises:
        StorageError: the write failed (e.g. disk full); ``path`` keeps its previous content and
            no temporary file is left.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        delay = os.environ.get(_WRITE_DELAY_ENV)
        if delay:
            time.sleep(float(delay))
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise storage_error(exc, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write_bytes` for JSON (indented, keys in insertion order, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


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
