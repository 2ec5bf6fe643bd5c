"""The paper's large-batch recipe for a training loop you already have, in one call.

Example:
    >>> import torch, bigbatch
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
    ...                             torch.nn.Linear(16, 10))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    >>> regime = {"epochs": 10, "phases": [{"epoch": 0, "lr": 0.1}, {"epoch": 5, "lr": 0.01}]}
    >>> lb = bigbatch.large_batch(model, optimizer, regime, base_batch_size=128, batch_size=4096,
    ...                           dataset_size=50000)
    >>> lb.regime.epochs, lb.regime.milestones, lb.num_updates, lb.updates_per_epoch
    (320.0, (160.0,), 4160, 13)
    >>> type(lb.model[1]).__name__, round(optimizer.param_groups[0]["lr"], 4)
    ('GhostBatchNorm1d', 0.5657)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigbatch.layers.convert import convert_ghost_batchnorm
from bigbatch.recipes.adapt import (
    adapt_regime,
    format_adaptation_table,
    num_updates,
    updates_per_epoch,
)
from bigbatch.recipes.regime import Regime
from bigbatch.recipes.scheduler import RegimeScheduler

__all__ = ["LargeBatchSetup", "large_batch"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LargeBatchSetup:
    """What :func:`large_batch` returns: the pieces a large-batch training loop uses.

    Attributes:
        model: the model with every BatchNorm replaced by ghost batch norm (the same object unless
            the model itself was a BatchNorm layer), or the model unchanged without ghost BN.
        scheduler: a :class:`~bigbatch.recipes.RegimeScheduler` on the optimizer; call
            ``scheduler.step()`` once after each ``optimizer.step()``.
        regime: the adapted regime (+LR, +RA, warm-up) the scheduler applies.
        base_regime: the regime as given, for :meth:`describe`.
        num_updates: optimizer steps the adapted regime trains for; stop after that many.
        updates_per_epoch: optimizer steps per epoch at ``batch_size``.
        clip_grad_norm: the gradient-norm bound to clip at before each step (the paper's code: 5),
            or None for no clipping.
        base_batch_size: the batch size the regime was tuned for.
        batch_size: the batch size of one update (all processes and accumulated micro-batches).
        dataset_size: training samples per epoch.
    """

    model: nn.Module
    scheduler: RegimeScheduler
    regime: Regime
    base_regime: Regime
    num_updates: int
    updates_per_epoch: int
    clip_grad_norm: float | None
    base_batch_size: int
    batch_size: int
    dataset_size: int

    def describe(self) -> str:
        """A table of the small-batch regime beside its large-batch adaptation (lrs, epochs...)."""
        return format_adaptation_table(self.base_regime, self.regime,
                                       base_batch_size=self.base_batch_size,
                                       batch_size=self.batch_size, dataset_size=self.dataset_size)


def large_batch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regime: Regime | Mapping[str, Any],
    *,
    base_batch_size: int,
    batch_size: int,
    dataset_size: int,
    ghost_batch_size: int | None = None,
    ghost_bn: bool = True,
    lr_scaling: str = "sqrt",
    regime_adaptation: bool | float = True,
    warmup_epochs: float = 0.0,
    clip_grad_norm: float | None = 5.0,
) -> LargeBatchSetup:
    """Turn a small-batch set-up (model, optimizer, regime) into the paper's large-batch one.

    Hoffer et al. 2017: ghost batch norm (+GBN), lr x sqrt(B / B0) (+LR), B / B0 times more epochs
    with every milestone stretched (+RA, so the number of updates stays that of small-batch
    training), an optional warm-up from the small-batch lr (Goyal et al. 2017) and gradient
    clipping. The model is converted in place and the optimizer gets the adapted regime's epoch-0
    settings at once; its param groups keep their values relative to the optimizer's defaults (a
    group with ``weight_decay=0`` stays at 0, see :func:`~bigbatch.recipes.apply_settings`).

    Args:
        model: the model, not yet wrapped in DistributedDataParallel (wrap it afterwards).
        optimizer: an optimizer over the model's parameters; the regime's settings (lr,
            momentum...) must be settings of it.
        regime: the small-batch :class:`~bigbatch.recipes.Regime` (or its dict form), tuned at
            ``base_batch_size``.
        base_batch_size: the batch size B0 the regime was tuned for.
        batch_size: the batch size B of one update: per-process batch x gradient accumulation
            steps x number of processes.
        dataset_size: training samples per epoch (to count updates).
        ghost_batch_size: samples per ghost batch; None: ``base_batch_size`` (the paper). It must
            divide the batch of each forward pass (``ValueError`` from the layer otherwise).
        ghost_bn: False keeps the model's BatchNorm layers.
        lr_scaling: ``"sqrt"`` (the paper), ``"linear"`` (Goyal et al.) or ``"none"``.
        regime_adaptation: True (x B/B0), False or an epoch factor, as in
            :func:`~bigbatch.recipes.adapt_regime`.
        warmup_epochs: linear warm-up length in adapted epochs (0: none).
        clip_grad_norm: returned for the loop to clip at (None: no clipping).

    Returns:
        A :class:`LargeBatchSetup` with the model, scheduler, adapted regime, number of updates and
        clipping bound.

    Raises:
        ConfigError: a bad batch size, scaling rule, regime, or a regime setting the optimizer
            does not have.
        ValueError: a bad ghost batch size, or a model wrapped in DistributedDataParallel.
    """
    base = regime if isinstance(regime, Regime) else Regime.from_dict(regime)
    adapted = adapt_regime(base, base_batch_size, batch_size, lr_scaling=lr_scaling,
                           regime_adaptation=regime_adaptation, warmup_epochs=warmup_epochs)
    if type(optimizer).__name__ != adapted.optimizer:
        logger.warning("the regime names %s but the optimizer is a %s; its settings are applied "
                       "to it anyway", adapted.optimizer, type(optimizer).__name__)
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
    if ghost_bn:
        model = convert_ghost_batchnorm(model, ghost_batch_size or base_batch_size)
    per_epoch = updates_per_epoch(dataset_size, batch_size)
    return LargeBatchSetup(
        model=model, scheduler=RegimeScheduler(optimizer, adapted, per_epoch), regime=adapted,
        base_regime=base, num_updates=num_updates(adapted, dataset_size, batch_size),
        updates_per_epoch=per_epoch, clip_grad_norm=clip_grad_norm,
        base_batch_size=base_batch_size, batch_size=batch_size, dataset_size=dataset_size)
