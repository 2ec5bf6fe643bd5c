"""Metrics writers: CSV, JSONL and (if installed) TensorBoard behind one small interface.

One row per evaluation, the same keys in every format. Rows are appended and flushed at once, so a
run killed at any point leaves complete lines. On resume, :func:`truncate_rows` drops rows logged
after the checkpoint (atomically) before new ones are appended, so a resumed run's files equal an
uninterrupted run's.

Example:
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> w = MetricsLogger(d, "metrics", tensorboard=False)
    >>> w.write({"updates": 1, "val_loss": 0.5})
    >>> w.close()
    >>> (d / "metrics.csv").read_text().splitlines()
    ['updates,val_loss', '1,0.5']
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bigbatch.fileio import atomic_write_text, storage_error

__all__ = [
    "CSVWriter",
    "JSONLWriter",
    "MetricsLogger",
    "TensorBoardWriter",
    "read_rows",
    "truncate_rows",
]


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: the CSV holds exactly the JSONL's numbers
    return v


class _AppendFile:
    """A file opened for appending on first write, flushed after each row; close() is idempotent."""

    path: Path
    _file: Any = None

    def _append(self, text: str, **open_kwargs: Any) -> None:
        try:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8", **open_kwargs)  # noqa: SIM115
            self._file.write(text)
            self._file.flush()
        except OSError as exc:  # disk full: one line naming the file (a torn row is cut on resume)
            raise storage_error(exc, self.path) from None

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # a flush that failed already raised StorageError from write()
                pass


class CSVWriter(_AppendFile):
    """Appends rows to a CSV file; the header comes from the first row (or the existing file).

    Args:
        path: the CSV file.
        fields: columns to write (default: every key of the first row). Rows must have these keys.
    """

    def __init__(self, path: str | Path, fields: Sequence[str] | None = None):
        self.path = Path(path)
        self.fields = list(fields) if fields is not None else None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), None)
            if header:
                self.fields = header
        self._file = None

    def write(self, row: Mapping[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row)
        missing = [k for k in self.fields if k not in row]
        if missing:
            raise ValueError(f"row for {self.path.name} lacks columns {missing}")
        # Format the row in memory and append it with one write, so a header and its first row
        # (or a row) are never split by a failed write.
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        if not self.path.exists() or self.path.stat().st_size == 0:
            writer.writerow(self.fields)
        writer.writerow([_csv_value(row[k]) for k in self.fields])
        self._append(buffer.getvalue(), newline="")


class JSONLWriter(_AppendFile):
    """Appends one JSON object per line (NaN/Inf written as JSON ``NaN``/``Infinity``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = None

    def write(self, row: Mapping[str, Any]) -> None:
        self._append(json.dumps(dict(row)) + "\n")



class TensorBoardWriter:
    """Scalars to TensorBoard (one tag per numeric key, step = ``updates``). Needs ``tensorboard``.

    Args:
        log_dir: event-file directory.
        purge_step: on resume, events at or after this step from the killed run are discarded.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def write(self, row: Mapping[str, Any], prefix: str = "") -> None:
        step = int(row.get("updates", 0))
        for key, value in row.items():
            if key != "updates" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}{key}", value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can be used (the ``tensorboard`` package imports)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


class MetricsLogger:
    """Writes each row to ``NAME.csv`` and ``NAME.jsonl`` (and TensorBoard when available).

    Args:
        run_dir: the run directory.
        name: file stem, e.g. ``"metrics"`` or ``"diffusion"``.
        csv_fields: CSV columns (default: all keys of the first row); the JSONL always gets every
            key.
        tensorboard: ``True``/``False``, or ``None`` = use it if the package imports.
        purge_step: see :class:`TensorBoardWriter`.
    """

    def __init__(
        self,
        run_dir: str | Path,
        name: str,
        *,
        csv_fields: Sequence[str] | None = None,
        tensorboard: bool | None = None,
        purge_step: int | None = None,
    ):
        run_dir = Path(run_dir)
        self.csv = CSVWriter(run_dir / f"{name}.csv", csv_fields)
        self.jsonl = JSONLWriter(run_dir / f"{name}.jsonl")
        self.name = name
        use_tb = tensorboard_available() if tensorboard is None else tensorboard
        self.tb = TensorBoardWriter(run_dir / "tensorboard", purge_step) if use_tb else None

    def write(self, row: Mapping[str, Any]) -> None:
        self.csv.write(row)
        self.jsonl.write(row)
        if self.tb is not None:
            self.tb.write(row, prefix=f"{self.name}/")

    def close(self) -> None:
        self.csv.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _parse_csv_value(text: str) -> Any:
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a metrics ``.csv`` (numbers parsed) or ``.jsonl`` file; ``[]`` if it is absent."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    return [{k: _parse_csv_value(v) for k, v in row.items()} for row in reader]


def truncate_rows(path: str | Path, max_updates: int) -> int:
    """Drop rows with ``updates > max_updates`` (logged after the checkpoint), atomically.

    A partial last line (a kill mid-write) is dropped too. Returns the number of rows kept.
    """
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    kept: list[str] = []
    if path.suffix == ".jsonl":
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if _updates_ok(row.get("updates"), max_updates):
                kept.append(line)
        atomic_write_text(path, "".join(kept))
        return len(kept)
    if not lines:
        return 0
    header, body = lines[0], lines[1:]
    columns = next(csv.reader([header]))
    idx = columns.index("updates") if "updates" in columns else None
    for line in body:
        values = next(csv.reader([line]), [])
        if (
            idx is not None
            and idx < len(values)
            and _updates_ok(_parse_csv_value(values[idx]), max_updates)
        ):
            kept.append(line)
    atomic_write_text(path, header + "".join(kept))
    return len(kept)


def _updates_ok(value: Any, max_updates: int) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value) and value <= max_updates
