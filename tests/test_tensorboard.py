"""TensorBoard event files (the optional `tensorboard` extra): same numbers as metrics.csv."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from bigbatch.train.config import RunConfig  # noqa: E402
from bigbatch.train.loop import train  # noqa: E402


def test_event_files_hold_the_metrics_rows(tmp_path):
    config = RunConfig.from_dict(
        dict(model="f1", model_options={"hidden": 16, "depth": 2}, dataset="synthetic",
             batch_size=256, epochs=2, device="cpu", progress="none")  # fmt: skip
    )
    run = tmp_path / "run"
    train(config, run)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("metrics/val_error_pct")
    assert [e.step for e in scalars] == [int(r["updates"]) for r in rows]
    assert [e.value for e in scalars] == pytest.approx([float(r["val_error_pct"]) for r in rows])
    assert "metrics/weight_distance" in events.Tags()["scalars"]  # the log-t curve, per eval
