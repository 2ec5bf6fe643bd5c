"""A Lightning callback that puts the paper's large-batch recipe on a LightningModule.

Example (``pip install bigbatch[lightning]``)::

    import lightning as L
    from bigbatch.integrations.lightning import LargeBatch

    regime = {"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9},
                                      {"epoch": 1.5, "lr": 0.01}]}
    trainer = L.Trainer(accumulate_grad_batches=4, max_epochs=-1, callbacks=[
        LargeBatch(regime, base_batch_size=32, batch_size=4 * 64, clip_grad_norm=5.0)])
    trainer.fit(module, loader)  # loader: batches of 64; the regime decides when training stops

See ``examples/lightning_train.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from bigbatch.diagnostics import WeightDistance
from bigbatch.layers.convert import convert_ghost_batchnorm
from bigbatch.recipes.adapt import adapt_regime, num_updates
from bigbatch.recipes.regime import Regime
from bigbatch.recipes.scheduler import RegimeScheduler

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("bigbatch.integrations.lightning needs Lightning: "
                      "pip install 'bigbatch[lightning]'") from e

__all__ = ["LargeBatch"]


class LargeBatch(Callback):
    """Ghost batch norm, lr scaling, regime adaptation, warm-up and clipping for a Lightning run.

    * before training (``setup``): every BatchNorm of the module becomes ghost batch norm of
      ``ghost_batch_size`` (the same parameters, so the optimizer and checkpoints are unaffected);
    * at the start of training: the regime, adapted from ``base_batch_size`` to ``batch_size``
      (+LR, +RA, warm-up: :func:`~bigbatch.recipes.adapt_regime`), goes onto the module's
      optimizer through a :class:`~bigbatch.recipes.RegimeScheduler`, stepped once per optimizer
      step (gradient accumulation counts once); training stops after the adapted regime's number
      of updates;
    * before each optimizer step: the gradient norm is clipped at ``clip_grad_norm`` (if set);
    * every ``trainer.log_every_n_steps`` updates: ``weight_distance`` (||w_t - w_0||, the
      paper's diffusion diagnostic, :class:`~bigbatch.diagnostics.WeightDistance`) and ``lr`` are
      logged through the module's logger.

    ``trainer.fit(..., ckpt_path=...)`` continues the schedule exactly: the optimizer state
    (with each group's ratio to the defaults) and the step count come back with Lightning's
    checkpoint, and the w_0 snapshot with this callback's state. Param groups keep their
    values relative to the optimizer's defaults (see :func:`~bigbatch.recipes.apply_settings`).

    Args:
        regime: the small-batch :class:`~bigbatch.recipes.Regime` (or its dict form), tuned at
            ``base_batch_size``; its settings must be settings of the module's optimizer.
        base_batch_size: the batch size B0 the regime was tuned for.
        batch_size: the batch size B of one update: the loader's batch size x
            ``accumulate_grad_batches`` x the number of devices.
        ghost_batch_size: samples per ghost batch; None: ``base_batch_size``; with
            ``ghost_bn=False`` the BatchNorm layers are kept.
        ghost_bn: convert BatchNorm layers to ghost batch norm.
        lr_scaling: ``"sqrt"``, ``"linear"`` or ``"none"``.
        regime_adaptation: True (x B/B0), False or an epoch factor.
        warmup_epochs: linear warm-up from the small-batch lr, in adapted epochs.
        clip_grad_norm: clip the global gradient norm at this value before each step (None: no).
        stop_at_end: stop training when the adapted regime's updates are done.

    Raises:
        ConfigError: a bad regime or batch size (at construction), or a regime setting the
            optimizer does not have (at the start of training).
    """

    def __init__(self, regime: Regime | Mapping[str, Any], *, base_batch_size: int,
                 batch_size: int, ghost_batch_size: int | None = None, ghost_bn: bool = True,
                 lr_scaling: str = "sqrt", regime_adaptation: bool | float = True,
                 warmup_epochs: float = 0.0, clip_grad_norm: float | None = None,
                 stop_at_end: bool = True) -> None:
        self.regime = adapt_regime(regime, base_batch_size, batch_size, lr_scaling=lr_scaling,
                                   regime_adaptation=regime_adaptation,
                                   warmup_epochs=warmup_epochs)
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        self.ghost_batch_size = (ghost_batch_size or base_batch_size) if ghost_bn else None
        self.batch_size = batch_size
        self.clip_grad_norm = clip_grad_norm
        self.stop_at_end = stop_at_end
        self.scheduler: RegimeScheduler | None = None
        self.weight_distance: WeightDistance | None = None
        self.num_updates: int | None = None
        self._loaded: dict[str, Any] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Convert BatchNorm to ghost batch norm (idempotent: a resumed run converts again)."""
        if self.ghost_batch_size is not None:
            convert_ghost_batchnorm(pl_module, self.ghost_batch_size)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the optimizer at the update Lightning is at (0, or the resumed one)."""
        if len(trainer.optimizers) != 1:
            raise ValueError(f"LargeBatch drives one optimizer; configure_optimizers returned "
                             f"{len(trainer.optimizers)}")
        if not math.isfinite(trainer.num_training_batches):
            raise ValueError("LargeBatch counts updates per epoch: give the Trainer a training "
                             "dataloader with a length (not an endless IterableDataset)")
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
        # updates = epochs x updates per epoch, counted the way the trainer will run them
        self.num_updates = num_updates(self.regime, per_epoch, 1)
        self.scheduler = RegimeScheduler(trainer.optimizers[0], self.regime, per_epoch)
        # Resuming: Lightning restored the optimizer (each group's ratio to the defaults with it)
        # and its step count, which is where the schedule continues.
        self.scheduler.load_state_dict({**self.scheduler.state_dict(),
                                        "last_epoch": trainer.global_step})
        self.weight_distance = WeightDistance(pl_module)
        if "weight_distance" in self._loaded:
            self.weight_distance.load_state_dict(self._loaded["weight_distance"])

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Clip the gradient norm (after Lightning unscaled mixed-precision gradients)."""
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(pl_module.parameters(), self.clip_grad_norm)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        """After an optimizer step: the next update's settings, the diagnostics, the stop."""
        scheduler = self.scheduler
        if scheduler is None or scheduler.last_epoch >= trainer.global_step:
            return  # an accumulation micro-batch: no optimizer step yet
        while scheduler.last_epoch < trainer.global_step:
            scheduler.step()
        if trainer.global_step % trainer.log_every_n_steps == 0:
            distance, _ = self.weight_distance(pl_module)
            pl_module.log("weight_distance", distance, on_step=True, on_epoch=False)
            pl_module.log("lr", float(scheduler.get_last_lr()[0]), on_step=True, on_epoch=False)
        if self.stop_at_end and trainer.global_step >= self.num_updates:
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        """The w_0 snapshot of the weight distance (tensors), for a resumed run's logs."""
        if self.weight_distance is None:
            return dict(self._loaded)
        return {"weight_distance": self.weight_distance.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state until training starts (the module's weights are final then)."""
        self._loaded = dict(state_dict)
