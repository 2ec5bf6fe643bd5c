"""Evaluation: loss and top-1/top-5 error equal a per-sample reference; the row of a run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bigbatch.distributed import DistContext
from bigbatch.train import RunConfig
from bigbatch.train.build import build_run
from bigbatch.train.evaluation import evaluate, evaluation_row


def _reference(model, batches, num_classes):
    losses, top1, top5 = [], [], []
    with torch.no_grad():
        for x, y in batches:
            for xi, yi in zip(x, y, strict=True):
                out = model(xi[None])[0]
                losses.append(float(nn.functional.cross_entropy(out[None], yi[None])))
                ranked = sorted(range(num_classes), key=lambda c: -float(out[c]))
                top1.append(ranked[0] == int(yi))
                top5.append(int(yi) in ranked[:5])
    n = len(losses)
    return sum(losses) / n, 100 * (1 - sum(top1) / n), 100 * (1 - sum(top5) / n)


def test_evaluate_equals_a_per_sample_reference_and_restores_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Linear(12, 10)).train()
    model(torch.randn(64, 6))  # running statistics to evaluate with
    batches = [(torch.randn(n, 6), torch.randint(0, 10, (n,))) for n in (16, 16, 5)]
    row = evaluate(model, batches, num_classes=10)
    assert model.training
    model.eval()
    loss, err1, err5 = _reference(model, batches, 10)
    assert row["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert row["val_error_pct"] == pytest.approx(err1)
    assert row["val_top5_error_pct"] == pytest.approx(err5)
    assert err5 < err1  # the two differ: the check is not vacuous


def test_the_row_of_a_run_averages_the_interval_and_names_its_units(tmp_path):
    config = RunConfig(model="f1", model_options={"hidden": 16, "depth": 2}, dataset="synthetic",
                       batch_size=256, epochs=1, device="cpu", progress="none")
    run = build_run(config, DistContext(), tmp_path)
    row = evaluation_row(run, weight_distance=0.0, wall_time_s=1.0)
    assert math.isnan(row["train_loss"]) and math.isnan(row["samples_per_s"])  # nothing trained
    c = run.state.counters
    c.updates, c.train_loss_sum, c.train_correct, c.train_samples = 4, 23.0, 64.0, 256
    c.interval_samples, c.interval_train_time_s = 256, 0.5
    row = evaluation_row(run, weight_distance=0.25, wall_time_s=2.0)
    assert list(row) == ["updates", "epoch", "samples", "lr", "train_loss", "train_error_pct",
                         "val_loss", "val_error_pct", "val_top5_error_pct", "weight_distance",
                         "wall_time_s", "samples_per_s", "skipped_steps"]
    assert row["train_loss"] == 23.0 / 256 and row["train_error_pct"] == 75.0
    assert row["epoch"] == 4 / run.plan.updates_per_epoch and row["samples_per_s"] == 512.0
    expected = evaluate(run.train_model, run.val_loader.iterate(0), num_classes=10)
    assert {k: row[k] for k in expected} == expected
