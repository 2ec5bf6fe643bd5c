"""Progress display: a tqdm bar on a terminal, plain ``logging`` lines otherwise.

``progress="auto"`` shows a bar only when stderr is a TTY, so logs of batch jobs and CI stay
readable (one line per evaluation, no carriage returns).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["Progress", "resolve_progress_mode"]

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
