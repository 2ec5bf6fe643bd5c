"""The report as a person sees it: report.html rendered by headless Chromium (Debian's package).

Skipped where no Chromium is installed; `.ci/run` installs Debian's `chromium` when it runs as root.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_report import GAP_GRID, make_grid

from bigbatch.report import write_report
from bigbatch.reproduce import PAPER_ARMS as ARMS  # the five arms of every preset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium")

# Flags for a sandboxed, offline root session: no network chatter, a throwaway profile.
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--hide-scrollbars"]  # fmt: skip


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip


# What each figure's caption starts with, in the report's order.
FIGURES = ["Validation error vs epochs", "Validation error vs wall-clock time",
           "Validation error vs updates", "Training loss", "Learning rate of each arm",
           "||w_t − w_0|| vs updates", "Final training vs validation error"]  # fmt: skip


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    grid_dir = make_grid(tmp_path_factory.mktemp("browser") / "grid", GAP_GRID)
    return write_report(grid_dir)[1]


def test_the_browser_builds_the_table_and_decodes_every_figure(report_html, tmp_path):
    # --dump-dom prints the DOM after layout, i.e. what the browser made of the file.
    dom = _chromium(tmp_path, "--dump-dom", report_html.as_uri()).stdout
    tables = re.findall(r"<table>(.*?)</table>", dom, flags=re.S)
    assert len(tables) == 2  # the results, and what each arm changes
    for table in tables:
        rows = re.findall(r"<tr>(.*?)</tr>", table, flags=re.S)
        assert [re.sub(r"<.*?>", "", r.split("</td>")[0]).strip() for r in rows[1:]] == list(ARMS)
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)"', dom)
    captions = [html.unescape(alt) for alt, _ in images]
    for figure in FIGURES:  # every figure of issue 15 is on the page, in this order
        assert sum(figure in c for c in captions) == 1, (figure, captions)
    positions = [next(i for i, c in enumerate(captions) if f in c) for f in FIGURES]
    assert positions == sorted(positions)
    for _, data in images:  # each decodes to a real plot, not a blank
        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"))
        assert min(pixels.shape) > 200 and pixels.std() > 10
    assert "http://" not in dom and "https://" not in dom  # nothing fetched from outside


def test_a_screenshot_shows_a_rendered_page(report_html, tmp_path):
    shot = tmp_path / "report.png"
    _chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", report_html.as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1200)
    # A blank or failed page is one flat colour; text, table rules and plots give many dark pixels.
    assert (pixels < 100).mean() > 0.01 and pixels.std() > 20
