"""The two things a run is made of: its :class:`Plan` (fixed at set-up) and its :class:`TrainState`.

The plan is what the config resolves to (the regimes, the number of updates, the device); it never
changes during the run and ``config.toml`` records it. The state is what training changes (the
model, the optimizer, the weight-distance origin and the :class:`Counters`); a checkpoint holds it
whole, with every process's random-number state, and a resume puts it back
(:mod:`bigbatch.train.rundir`).

Example:
    >>> c = Counters(updates=3)
    >>> c.updates, c.best_val_error_pct
    (3, inf)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from bigbatch.train.config import RunConfig

__all__ = ["Counters", "Plan", "TrainState"]


@dataclasses.dataclass
class Counters:
    """Everything besides tensors that a checkpoint needs to continue exactly where it stopped."""

    updates: int = 0
    samples: int = 0
    skipped_steps: int = 0
    best_val_error_pct: float = math.inf
    wall_time_s: float = 0.0
    # time in updates (their batches loaded), evaluations and checkpoints excluded: closed intervals
    train_time_s: float = 0.0
    # samples trained before a resume from a checkpoint that did not time training (bigbatch
    # < 0.2): left out of train_samples_per_s, whose time they are not in
    untimed_samples: int = 0
    # train averages since the last evaluation
    train_loss_sum: float = 0.0
    train_correct: float = 0.0
    train_samples: int = 0
    interval_train_time_s: float = 0.0
    interval_samples: int = 0

    def end_interval(self, val_error_pct: float) -> bool:
        """Start the next evaluation interval; whether ``val_error_pct`` is the best so far.

        Example:
            >>> c = Counters(train_samples=5, best_val_error_pct=10.0)
            >>> c.end_interval(8.0), c.best_val_error_pct, c.train_samples
            (True, 8.0, 0)
        """
        self.train_time_s += self.interval_train_time_s
        self.train_loss_sum = self.train_correct = 0.0
        self.train_samples = self.interval_samples = 0
        self.interval_train_time_s = 0.0
        best = val_error_pct < self.best_val_error_pct
        self.best_val_error_pct = min(self.best_val_error_pct, val_error_pct)
        return best


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the run's config resolves to at set-up; fixed for the whole run.

    Attributes:
        config: the run config, with the regime written out (the model's default if none).
        base_regime, regime: the regime before and after large-batch adaptation
            (``bigbatch.recipes.Regime``).
        dataset_size: training samples.
        updates_per_epoch: the loader's batches per epoch.
        num_updates: updates of the whole run (``recipes.num_updates``).
        device: this process's device.
        world_size: number of processes.
    """

    config: RunConfig
    base_regime: Any
    regime: Any
    dataset_size: int
    updates_per_epoch: int
    num_updates: int
    device: torch.device
    world_size: int = 1

    def epoch(self, updates: int) -> float:
        """The fractional epoch after ``updates`` updates."""
        return updates / self.updates_per_epoch


@dataclasses.dataclass
class TrainState:
    """What training changes, saved and restored whole (with the RNG states) by ``rundir``.

    Attributes:
        model: the plain model (not wrapped in DDP or ``torch.compile``).
        optimizer: its optimizer.
        weight_distance: the ``||w - w0||`` origin (``bigbatch.diagnostics.WeightDistance``).
        counters: updates, samples, best error, wall time and the interval's sums.
        noise_scale: the running noise-scale estimates
            (``bigbatch.diagnostics.GradientNoiseScale``), ``None`` unless ``noise_scale``.
        adascale: AdaScale's progress (``bigbatch.recipes.adascale.AdaScale``), ``None`` unless
            ``lr_scaling = "adascale"``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    weight_distance: Any
    counters: Counters = dataclasses.field(default_factory=Counters)
    noise_scale: Any = None
    adascale: Any = None

    def extra_state_dict(self) -> dict[str, Any]:
        """The noise-scale and AdaScale states as plain numbers (only those the run uses: the
        checkpoint of a run without them is unchanged)."""
        return {name: part.state_dict() for name, part in (("noise_scale", self.noise_scale),
                                                          ("adascale", self.adascale))
                if part is not None}

    def load_extra_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Restore :meth:`extra_state_dict` from a checkpoint (exactly: every running average).

        Raises:
            ValueError: the run measures the noise scale (or uses AdaScale) but the checkpoint
                holds no such state.
        """
        for name in ("noise_scale", "adascale"):
            part, saved = getattr(self, name), checkpoint.get(name)
            if part is None:
                continue
            if saved is None:
                raise ValueError(f"the checkpoint holds no {name} state, which this run needs: "
                                 f"resume with the config the run was started with")
            part.load_state_dict(saved)

    def lr(self) -> float:
        """The learning rate of the first parameter group now."""
        return float(self.optimizer.param_groups[0]["lr"])
