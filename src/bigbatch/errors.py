"""Exception types for input that the user can fix.

Every error bigbatch raises for bad input derives from :class:`BigBatchError` *and*
``ValueError`` (or ``OSError`` for files), so library callers can catch the standard type while
the CLI catches ``BigBatchError`` at its boundary and prints one line instead of a traceback.
"""

from __future__ import annotations

__all__ = ["BigBatchError", "ConfigError", "DataError", "DivergenceError", "DownloadError"]


class BigBatchError(Exception):
    """Base class of errors caused by input the user can change (config, files, flags)."""


class ConfigError(BigBatchError, ValueError):
    """A configuration key or command-line value is invalid; the message names key and fix."""


class DataError(BigBatchError, ValueError):
    """A dataset file or directory is missing, corrupt or in the wrong format (names the file)."""


class DownloadError(BigBatchError, OSError):
    """A download failed, was truncated or did not match its SHA-256 checksum."""


class DivergenceError(BigBatchError, RuntimeError):
    """Training produced a NaN or Inf loss or gradient."""
