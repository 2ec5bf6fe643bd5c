"""The reproduction report: tables, figures and a generated paragraph from a grid's run directories.

Example:
    >>> from bigbatch.report import write_report
    >>> md_path, html_path = write_report("runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

from bigbatch.report.render import write_report
from bigbatch.report.tables import ARM_SLUGS, ARMS, load_grid

__all__ = ["ARMS", "ARM_SLUGS", "load_grid", "write_report"]
