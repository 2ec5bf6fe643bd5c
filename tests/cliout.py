"""What the CLI printed: helpers shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("bigbatch: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
