"""Progress display: a tqdm bar on a terminal, plain ``logging`` lines otherwise.

``progress="auto"`` shows a bar only when stderr is a TTY, so logs of batch jobs and CI stay
readable (one line per evaluation, no carriage returns).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["GridProgress", "Progress", "resolve_progress_mode"]

log = logging.getLogger("bigbatch.train")


def resolve_progress_mode(progress: str) -> str:
    """``"bar"``, ``"log"`` or ``"none"`` for a config value (``"auto"``: bar on a terminal)."""
    if progress == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return progress


class Progress:
    """Counts updates; shows a bar (``mode="bar"``) and logs evaluation lines (bar or log mode).

    Args:
        total: number of updates of the run.
        initial: updates already done (on resume).
        mode: ``"bar"``, ``"log"`` or ``"none"`` (see :func:`resolve_progress_mode`).
    """

    def __init__(self, total: int, initial: int = 0, mode: str = "log"):
        self.mode = mode
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="upd", dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        """A line for the user: above the bar in bar mode, a log record in log mode."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.mode == "log":
            log.info(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class GridProgress:
    """One display for a whole ``reproduce`` grid: runs done and the estimated time left.

    In bar mode a tqdm bar counts the grid's work in epochs of training (each run weighs its
    effective epochs, so a regime-adapted run counts x B/B0 and the estimate follows the real
    cost), shows ``runs done/total`` and tqdm's time left; each finished run prints one line above
    it, and the runs themselves stay quiet (no bar of their own, engine logs at warnings only). In
    log mode every line is a log record and each run logs as usual; ``none`` shows nothing.

    Args:
        weights: the epochs of every run of the grid, in order.
        done: how many of them are already complete (their work counts as done, not as speed).
        mode: ``"bar"``, ``"log"`` or ``"none"``.
        logger: where log-mode lines go.
    """

    def __init__(self, weights: list[float], done: list[bool], mode: str,
                 logger: logging.Logger) -> None:  # fmt: skip
        self.mode, self._log = mode, logger
        self._runs, self._done = len(weights), sum(done)
        self._bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            initial = sum(w for w, d in zip(weights, done, strict=True) if d)
            self._bar = tqdm(total=sum(weights), initial=initial, unit="ep", dynamic_ncols=True,
                             desc=self._count(), bar_format="{desc} {percentage:3.0f}%|{bar}| "
                             "[{elapsed} elapsed, {remaining} left]")  # fmt: skip

    @property
    def quiet_runs(self) -> bool:
        """Whether each run must keep quiet under the grid's bar."""
        return self._bar is not None

    def _count(self) -> str:
        return f"grid: runs {self._done}/{self._runs} done,"

    def message(self, text: str) -> None:
        """A line: above the bar, or a log record."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.mode == "log":
            self._log.info(text)

    def finished(self, weight: float, text: str, *, warning: bool = False) -> None:
        """A run just ran (or failed): ``weight`` epochs of work done, and its line."""
        self._done += 1
        if self._bar is not None:
            self._bar.set_description_str(self._count(), refresh=False)
            self._bar.update(weight)
        if warning and self._bar is None:
            self._log.warning(text)  # shown also with --quiet
        else:
            self.message(text)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Under the bar, the engine logs warnings only while a run runs."""
        engine = logging.getLogger("bigbatch.train")
        level = engine.level
        if self._bar is not None:
            engine.setLevel(logging.WARNING)
        try:
            yield
        finally:
            engine.setLevel(level)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
