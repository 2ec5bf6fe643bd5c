"""The reproduction report: tables, figures and generated prose from a grid's run directories.

One module per concern, importing only downwards: ``grid`` (loading a grid directory), ``stats``
(per-arm statistics and table cells), ``diffusion`` (the weight-distance fits), ``prose`` (the
generated sentences), ``plots`` (matplotlib figures) and ``render`` (report.md and report.html).

Example:
    >>> from bigbatch.report import write_report
    >>> md_path, html_path = write_report("runs/demo")  # doctest: +SKIP
"""

from __future__ import annotations

from bigbatch.report.grid import load_grid
from bigbatch.report.render import write_report
from bigbatch.reproduce import ARM_SLUGS, ARMS

__all__ = ["ARMS", "ARM_SLUGS", "load_grid", "write_report"]
