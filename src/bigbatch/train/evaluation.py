"""Evaluation: validation loss and top-1/top-5 error, as sums that add up over DDP processes.

:func:`evaluate` is the public one-call version; the training loop calls :func:`evaluation_row`,
which evaluates this process's shard of every validation batch, adds the sums up over processes and
returns the row that the loop writes to ``metrics.csv``/``.jsonl``.
(Named ``evaluation`` rather than ``evaluate`` so that the module never shadows the function
``bigbatch.train.evaluate``.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Linear(4, 3)
    >>> batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    >>> sorted(evaluate(model, batches, num_classes=3))
    ['val_error_pct', 'val_loss']
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import distributed
from bigbatch.errors import ConfigError

__all__ = ["evaluate", "evaluation_row"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    autocast: contextlib.AbstractContextManager | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Validation loss and top-1 (and top-5 when ``num_classes > 5``) error in percent.

    Puts the model in eval mode (batch norm uses its running statistics) and restores train mode.
    """
    return _val_row(
        _evaluation_sums(
            model, batches, num_classes=num_classes, autocast=autocast, channels_last=channels_last
        ),
        num_classes,
    )


@torch.no_grad()
def _evaluation_sums(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    autocast: contextlib.AbstractContextManager | None = None,
    channels_last: bool = False,
) -> dict[str, float | int]:
    """Loss sum, top-1/top-5 hits and sample count over ``batches`` (this process's shard under
    DDP: sums add up over processes, averages would not)."""
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = 0.0
    n = 0
    try:
        for x, y in batches:
            if y.numel() == 0:
                continue  # a shard of a last batch smaller than the number of processes
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast or contextlib.nullcontext():
                out = model(x)
            out = out.float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").item()
            top = out.topk(min(5, num_classes), dim=1).indices
            hits = top == y[:, None]
            correct1 += hits[:, 0].sum().item()
            correct5 += hits.any(dim=1).sum().item()
            n += y.numel()
    finally:
        model.train(was_training)
    return {
        "val_loss_sum": loss_sum,
        "val_correct1": correct1,
        "val_correct5": correct5,
        "val_samples": n,
    }


def _val_row(sums: dict[str, float | int], num_classes: int) -> dict[str, float]:
    n = sums["val_samples"]
    if n == 0:
        raise ConfigError("the validation set is empty")
    row = {
        "val_loss": sums["val_loss_sum"] / n,
        "val_error_pct": 100.0 * (1 - sums["val_correct1"] / n),
    }
    if num_classes > 5:
        row["val_top5_error_pct"] = 100.0 * (1 - sums["val_correct5"] / n)
    return row


def evaluation_row(run: Any, *, weight_distance: float, wall_time_s: float) -> dict[str, Any]:
    """The metrics row of an evaluation now: validation loss and errors, the train averages of the
    interval since the last evaluation, the weight distance, time and speed.

    Every process calls this (it holds two collectives): ghost BN is local, so each process's
    running statistics come from its own slices, and they are first replaced by their average over
    processes (the same model on every process, also for the checkpoint that follows). Each process
    then evaluates its contiguous slice of every validation batch, and the sums (not the averages)
    are added up over processes in one collective.

    Args:
        run: the ``bigbatch.train.build.Run``.
        weight_distance: ``||w_t - w_0||`` now.
        wall_time_s: training time so far.
    """
    c, num_classes = run.state.counters, run.info.num_classes
    distributed.average_bn_running_stats(run.state.model, run.ctx)
    val_sums = _evaluation_sums(run.train_model, run.val_loader.iterate(0, shard=run.shard),
                                num_classes=num_classes, autocast=run.autocast,
                                channels_last=run.channels_last)  # fmt: skip
    train_sums = {"loss": c.train_loss_sum, "correct": c.train_correct, "samples": c.train_samples}
    sums = distributed.reduce_metrics({**train_sums, **val_sums}, run.ctx)
    seen = max(sums["samples"], 1)
    return {
        "updates": c.updates,
        "epoch": run.plan.epoch(c.updates),
        "samples": c.samples,
        "lr": run.state.lr(),
        "train_loss": sums["loss"] / seen if sums["samples"] else math.nan,
        "train_error_pct": 100.0 * (1 - sums["correct"] / seen) if sums["samples"] else math.nan,
        **_val_row(sums, num_classes),
        "weight_distance": weight_distance,
        "wall_time_s": wall_time_s,
        "samples_per_s": c.interval_samples / c.interval_train_time_s
        if c.interval_train_time_s > 0
        else math.nan,
        "skipped_steps": c.skipped_steps,
    }
