"""File I/O shared by the engine, the grid runner and the report (no torch import).

Reading: :func:`parse_data_text` turns TOML or YAML text into plain data (``tomllib`` /
``yaml.safe_load``, never executed), with a one-line error; ``tomllib`` here is the standard
library's, or ``tomli`` on Python 3.10.

Writing:
Every output file goes through :func:`atomic_write_bytes`: the data goes to a temporary file in the
same directory, is flushed and fsynced, then ``os.replace``-d over the target, and the directory is
fsynced. A crash (or SIGKILL) at any moment leaves either the old file or the new one, never half of
each.

A write that fails (disk full, read-only filesystem, a directory where the file should go) raises
:class:`StorageError`, a one-line ``BigBatchError`` naming the path ("no space left on device
writing ..."); the previous file is intact and the temporary file removed. A process killed
mid-write leaves a stray ``.NAME.*.tmp`` file: readers never look at it, and
:func:`remove_stale_temp_files` (called on resume) deletes it.

Fault injection for tests: when the environment variable ``BIGBATCH_TEST_WRITE_DELAY_S`` is set,
every atomic write sleeps that many seconds after writing the temporary file and before renaming
it, widening the "killed during a write" window from microseconds to something a test can hit
(``tests/test_reliability_kill.py``). Unset, it costs one dict lookup per write.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bigbatch.errors import BigBatchError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "StorageError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "drop_none",
    "parse_data_text",
    "plain",
    "read_summary",
    "remove_stale_temp_files",
    "storage_error",
]

log = logging.getLogger("bigbatch")

TEMP_PATTERN = ".*.tmp"  # what atomic_write_bytes names its temporary files (mkstemp below)
_WRITE_DELAY_ENV = "BIGBATCH_TEST_WRITE_DELAY_S"


def _file_mode() -> int:
    # mkstemp creates 0600 files; outputs should get the mode a plain open() would (0666 & ~umask)
    # so that colleagues on a shared machine can read runs. os.umask can only be read by setting it.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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


def remove_stale_temp_files(*directories: str | Path) -> list[Path]:
    """Delete temporary files left in ``directories`` by writes that were killed; returns them.

    Only names that :func:`atomic_write_bytes` creates (``.NAME.XXXX.tmp``) are touched, and each
    is logged. Call it when no other process writes to the directories (on resume).
    """
    removed = []
    for directory in directories:
        for path in Path(directory).glob(TEMP_PATTERN):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
                log.info("removed %s (left by an interrupted write)", path)
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
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), _file_mode())
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


def parse_data_text(text: str, fmt: str, context: str) -> Any:
    """Parse TOML (``fmt="toml"``) or YAML (``"yaml"``) text as plain data; nothing is executed.

    Args:
        text: the document.
        fmt: ``"toml"`` or ``"yaml"``.
        context: what the message starts with, e.g. ``"cannot parse config file 'run.yaml'"``.

    Returns:
        The parsed value (a dict for TOML; any YAML value, None for an empty YAML document).

    Raises:
        ConfigError: ``"<context>: <first line of the parser's message>"`` — a syntax error, or a
            YAML tag that ``safe_load`` refuses (``!!python/object`` ...).

    Example:
        >>> parse_data_text("lr = 0.1", "toml", "regime")
        {'lr': 0.1}
    """
    try:
        if fmt == "toml":
            return tomllib.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - tomllib/yaml raise their own (and ValueError); report
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{context}: {first}") from None


def plain(v: Any, *, keep_none: bool = True) -> Any:
    """A deep copy of plain data: mappings become dicts, tuples lists (what TOML/YAML writers and
    users expect); ``keep_none=False`` also leaves out ``None`` values (TOML has no null).

    Example:
        >>> plain({"a": (1, 2), "b": None})
        {'a': [1, 2], 'b': None}
    """
    if isinstance(v, Mapping):
        return {k: plain(x, keep_none=keep_none) for k, x in v.items()
                if keep_none or x is not None}
    if isinstance(v, (list, tuple)):
        return [plain(x, keep_none=keep_none) for x in v]
    return v


def drop_none(v: Any) -> Any:
    """Plain data without its ``None`` values (TOML has no null), recursively.

    Example:
        >>> drop_none({"a": 1, "b": None, "c": [{"d": None}]})
        {'a': 1, 'c': [{}]}
    """
    return plain(v, keep_none=False)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of the run in ``run_dir``, or ``{}`` when it is absent, torn or not a
    table (the run is then unfinished). The one reader of summaries: the loop, the CLI, the grid
    and its report (here, without torch, for the report).
    """
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}
