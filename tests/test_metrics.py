"""Metrics files: the same keys in CSV and JSONL, rows that survive a kill and a resume."""

from __future__ import annotations

import pytest

from bigbatch.train.metrics import MetricsLogger, read_rows, truncate_rows


def test_metrics_logger_writes_identical_keys_to_csv_and_jsonl(tmp_path):
    log = MetricsLogger(tmp_path, "metrics", tensorboard=False)
    rows = [{"updates": u, "val_loss": 1.0 / u, "lr": 0.1} for u in (1, 2, 3)]
    for row in rows:
        log.write(row)
    log.close()
    assert read_rows(tmp_path / "metrics.csv") == rows == read_rows(tmp_path / "metrics.jsonl")


def test_csv_columns_are_fixed_by_the_first_row(tmp_path):
    log = MetricsLogger(tmp_path, "m", tensorboard=False)
    log.write({"updates": 1, "a": 1.0})
    with pytest.raises(ValueError, match=r"lacks columns \['a'\]"):
        log.write({"updates": 2})
    log.close()


def test_truncate_rows_drops_rows_after_the_checkpoint_and_partial_lines(tmp_path):
    log = MetricsLogger(tmp_path, "metrics", tensorboard=False)
    for u in (4, 8, 12):
        log.write({"updates": u, "x": float(u)})
    log.close()
    for suffix in (".csv", ".jsonl"):
        with open(tmp_path / f"metrics{suffix}", "a") as f:
            f.write("16,1" if suffix == ".csv" else '{"updates": 16, "x"')  # killed mid-write
    assert truncate_rows(tmp_path / "metrics.csv", 8) == 2
    assert truncate_rows(tmp_path / "metrics.jsonl", 8) == 2
    expected = [{"updates": 4, "x": 4.0}, {"updates": 8, "x": 8.0}]
    assert read_rows(tmp_path / "metrics.csv") == expected == read_rows(tmp_path / "metrics.jsonl")
    # appending after a truncation continues the same file with the same header
    log = MetricsLogger(tmp_path, "metrics", tensorboard=False)
    log.write({"updates": 12, "x": 12.0})
    log.close()
    assert [r["updates"] for r in read_rows(tmp_path / "metrics.csv")] == [4, 8, 12]
    assert truncate_rows(tmp_path / "absent.csv", 3) == 0
