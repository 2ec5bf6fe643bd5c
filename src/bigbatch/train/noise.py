"""The engine's gradient noise scale (``--noise-scale``) and AdaScale (``lr_scaling = "adascale"``).

:class:`NoiseMeter` is what the loop (:mod:`bigbatch.train.loop`) calls around each update. The
small-batch gradient comes from

- each **micro-batch** during gradient accumulation (``micro_batch_size`` smaller than this
  process's batch): :class:`~bigbatch.diagnostics.MicroBatchGradNorms`, ``B_s`` = the micro-batch;
- otherwise, under DDP, each **process's local gradient**: a communication hook,
  :class:`~bigbatch.diagnostics.DDPGradNorms`, ``B_s`` = the per-process batch;

and the big one is the update's gradient, ``B_b`` = the global batch (its squared norm before
clipping). With neither there is nothing to compare: :func:`attach` says so in one line and the run
trains unmeasured. Only every ``noise_scale_every``-th update is measured (the hooks cost a few % of
an update, ``benchmarks/RESULTS.md``); the estimates are moving averages anyway. Under DDP the small
squared norm is averaged over processes before it is used, so every process holds the same
estimate and the same AdaScale gain.

The running averages (:class:`~bigbatch.diagnostics.GradientNoiseScale`) and AdaScale's progress
(:class:`~bigbatch.recipes.adascale.AdaScale`) live in the
:class:`~bigbatch.train.state.TrainState`, so a checkpoint carries them and a resume continues
exactly. A run without ``noise_scale`` builds no meter: its arithmetic is unchanged.

Each metrics row gets :data:`NOISE_COLUMNS` (empty when not measured, or while an estimate is not
yet defined, e.g. ``b_simple`` while ``|G|^2 <= 0``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch

from bigbatch import distributed
from bigbatch.errors import ConfigError

__all__ = ["NOISE_COLUMNS", "NoiseMeter", "advise_run_dir", "attach", "noise_columns"]

log = logging.getLogger("bigbatch.train")

NOISE_COLUMNS = ("trace_sigma", "grad_sq_norm", "b_simple", "adascale_gain", "adascale_tau")


def attach(run: Any) -> NoiseMeter | None:
    """Set up the measurement for ``run`` (a ``bigbatch.train.build.Run``), before any restore.

    Puts a fresh estimator (and AdaScale) into ``run.state``, registers the gradient hooks and,
    under AdaScale, lets ``run.plan.num_updates`` be at least the small-batch run's updates (the
    most AdaScale can take, with a gain of 1 throughout).

    Returns:
        The meter, or ``None`` when ``noise_scale`` is off or there is no small batch to use.

    Raises:
        ConfigError: ``lr_scaling = "adascale"`` without a small batch to measure with.
    """
    from bigbatch.diagnostics import GradientNoiseScale

    config = run.plan.config
    if not config.noise_scale:
        return None
    per_rank = config.batch_size // run.ctx.world_size
    micro = bool(config.micro_batch_size and config.micro_batch_size < per_rank)
    if not micro and run.ctx.world_size == 1:
        message = (f"--noise-scale needs a small batch beside the batch of {config.batch_size}: "
                   f"set --micro-batch-size (e.g. {max(1, config.batch_size // 4)}) or train "
                   f"under torchrun with several processes")
        if config.lr_scaling == "adascale":
            raise ConfigError(f"lr_scaling='adascale': {message}")
        log.warning("%s; training without measuring the noise scale", message)
        return None
    run.state.noise_scale = GradientNoiseScale(decay=config.noise_scale_decay)
    if config.lr_scaling == "adascale":
        from bigbatch.data.pipeline import train_batches_per_epoch
        from bigbatch.recipes.adascale import AdaScale

        base_upe = train_batches_per_epoch(run.plan.dataset_size, config.base_batch_size)
        run.state.adascale = AdaScale(run.plan.base_regime, base_upe)
        cap = math.ceil(run.state.adascale.total_tau * (1 - 1e-9))
        run.plan = dataclasses.replace(run.plan, num_updates=max(run.plan.num_updates, cap))
    return NoiseMeter(run, micro=micro)


class NoiseMeter:
    """Measures ``|g_s|^2`` and ``|g_b|^2`` on every K-th update; drives AdaScale (see module).

    Args:
        run: the ``bigbatch.train.build.Run`` (its state holds the estimator).
        micro: take the small batch from micro-batches (else from the DDP processes).
    """

    def __init__(self, run: Any, *, micro: bool) -> None:
        from bigbatch.diagnostics import DDPGradNorms, MicroBatchGradNorms

        self.run = run
        self.every = run.plan.config.noise_scale_every
        self.micro_norms = MicroBatchGradNorms(run.params) if micro else None
        self.ddp_norms = None if micro else DDPGradNorms(_ddp_module(run.train_model))
        self.measuring = False
        self._sizes: list[int] = []

    @property
    def state(self) -> Any:
        return self.run.state

    @property
    def done(self) -> bool:
        """AdaScale's progress has reached the small-batch run's number of updates."""
        return self.state.adascale is not None and self.state.adascale.done

    def settings(self, global_n: int) -> dict[str, Any]:
        """AdaScale's settings for the next update: lr = gain x base lr at tau; tau += gain."""
        base = self.run.plan.config.base_batch_size
        gain = self.state.noise_scale.gain(max(global_n, base), base)
        return self.state.adascale.step(gain)

    def begin(self, updates: int) -> bool:
        """Whether update ``updates + 1`` is measured; switches the hooks on or off for it."""
        self.measuring = updates % self.every == 0
        for source in (self.micro_norms, self.ddp_norms):
            if source is not None:
                source.enabled = self.measuring
        self._sizes = []
        return self.measuring

    def after_backward(self, micro_batch_size: int) -> None:
        """``forward_backward``'s callback after each micro-batch's backward."""
        if self.micro_norms is not None:
            self.micro_norms.end_micro_batch()
            self._sizes.append(micro_batch_size)

    def norms(self, global_n: int,
              grad_norm: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor] | None:
        """``(|g_s|^2, B_s, |g_b|^2)`` of this update (tensors, no host sync), or ``None``.

        Call after the backward; every process calls it (a collective). The big batch is
        ``global_n``; ``grad_norm`` is the update's gradient norm before clipping (``grad_norm``'s
        result), whose square is ``|g_b|^2`` for micro-batches.
        """
        ctx = self.run.ctx
        if self.micro_norms is not None:
            # Each micro-batch's loss sum was divided by global_n / world_size: its own mean
            # gradient is the hook's gradient times that over its size.
            total = global_n / ctx.world_size
            small = self.micro_norms.pop([total / b for b in self._sizes]).mean()
            if ctx.enabled:
                small = distributed.all_reduce_sum(small.float(), ctx) / ctx.world_size
            # Several micro-batches of unequal sizes: the harmonic mean (MicroBatchGradNorms.pop).
            small_batch = len(self._sizes) / sum(1.0 / b for b in self._sizes)
            big = grad_norm.square()  # the norm the update clips: the gradients read once
        else:
            small, big = self.ddp_norms.collect()
            small_batch = global_n / ctx.world_size
        if not global_n > small_batch:
            return None  # one micro-batch in one process: the two batches are the same
        return small, small_batch, big

    def record(self, small_sq: float, small_batch: float, big_sq: float, global_n: int) -> None:
        """Feed one finite measurement to the running estimates."""
        if math.isfinite(small_sq) and math.isfinite(big_sq):
            self.state.noise_scale.update(small_sq, small_batch, big_sq, global_n)

    def summary(self, updates_per_epoch: int) -> dict[str, Any]:
        """The summary's noise-scale (and AdaScale) entries."""
        out = {"noise_scale_measurements": self.state.noise_scale.num_updates,
               **{k: v for k, v in noise_columns(self).items() if k != "adascale_gain"}}
        ada = self.state.adascale
        if ada is not None:
            out.update(epochs=ada.num_updates / updates_per_epoch, adascale_total_tau=ada.total_tau,
                       adascale_final_gain=ada.last_gain)
        return out


def _ddp_module(model: torch.nn.Module) -> torch.nn.Module:
    """The DDP module inside a ``torch.compile`` wrapper (or the model itself)."""
    return getattr(model, "_orig_mod", model)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def noise_columns(meter: NoiseMeter | None) -> dict[str, float | None]:
    """The metrics row's :data:`NOISE_COLUMNS` now (all ``None`` without a meter)."""
    row: dict[str, float | None] = dict.fromkeys(NOISE_COLUMNS)
    if meter is None:
        return row
    noise, ada = meter.state.noise_scale, meter.state.adascale
    row.update(trace_sigma=_finite(noise.trace_sigma), grad_sq_norm=_finite(noise.grad_sq_norm),
               b_simple=_finite(noise.b_simple))
    if ada is not None:
        row.update(adascale_gain=ada.last_gain, adascale_tau=ada.tau)
    return row


def advise_run_dir(run_dir: str | Path) -> list[str]:
    """What ``bigbatch advise RUN_DIR`` prints: ``advise_batch_size(...).lines()`` from the run's
    ``b_simple`` column, at its batch size over its ``base_batch_size``.

    Raises:
        ConfigError: no run there, or a run that did not measure the noise scale.
    """
    from bigbatch.diagnostics import advise_batch_size
    from bigbatch.train.config import load_config
    from bigbatch.train.metrics import read_rows

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.toml); give the "
                          f"directory of a `bigbatch train --noise-scale` run")
    config = load_config(run_dir / "config.toml")
    series = [r["b_simple"] for r in read_rows(run_dir / "metrics.csv")
              if isinstance(r.get("b_simple"), float)]
    if not series:
        raise ConfigError(f"{run_dir} has no B_simple measurement in metrics.csv: train with "
                          f"--noise-scale and --micro-batch-size (or under torchrun)")
    base = config.base_batch_size if config.base_batch_size <= config.batch_size else None
    try:
        advice = advise_batch_size(series, config.batch_size, base)
    except ValueError as e:
        raise ConfigError(f"{run_dir}: {e}") from None
    return [f"{run_dir}: {len(series)} evaluations with B_simple, batch {config.batch_size}",
            *advice.lines()]
