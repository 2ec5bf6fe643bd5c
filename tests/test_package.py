"""Package surface: public names resolve, the README example runs, `-m bigbatch` works."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import bigbatch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(set(bigbatch.__all__) - {"__version__"}))
def test_public_name_resolves(name):
    assert getattr(bigbatch, name) is not None
    assert name in dir(bigbatch)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'GhostBatchNorm4d'"):
        bigbatch.GhostBatchNorm4d  # noqa: B018


def test_readme_python_examples_run():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own README


def test_python_dash_m_bigbatch_help():
    result = subprocess.run(
        [sys.executable, "-m", "bigbatch", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    for command in ("train", "reproduce", "report"):
        assert command in result.stdout
