"""Diagnostics of a training run: how far the weights travel, and how noisy the gradient is.

- :mod:`~bigbatch.diagnostics.weight_distance`: ``||w_t - w_0||`` and its log / sqrt fits
  (Hoffer et al. 2017, section 3).
- :mod:`~bigbatch.diagnostics.noise_scale`: the gradient noise scale ``B_simple``
  (McCandlish et al. 2018), one-shot and online.
- :mod:`~bigbatch.diagnostics.grad_sources`: the small-batch squared norms a loop gets from
  micro-batches or from DDP processes.
- :mod:`~bigbatch.diagnostics.advice`: what a measured noise scale says about the batch size.
"""

from __future__ import annotations

from bigbatch.diagnostics.advice import BatchSizeAdvice, advise_batch_size
from bigbatch.diagnostics.grad_sources import DDPGradNorms, MicroBatchGradNorms
from bigbatch.diagnostics.noise_scale import (
    GradientNoiseScale,
    NoiseScaleEstimate,
    estimate_noise_scale,
    squared_grad_norm,
    two_batch_estimates,
)
from bigbatch.diagnostics.weight_distance import (
    Fit,
    LogFit,
    SqrtFit,
    WeightDistance,
    fit_log,
    fit_sqrt,
    log_spaced_updates,
)

__all__ = [
    "BatchSizeAdvice", "DDPGradNorms", "Fit", "GradientNoiseScale", "LogFit",
    "MicroBatchGradNorms", "NoiseScaleEstimate", "SqrtFit", "WeightDistance", "advise_batch_size",
    "estimate_noise_scale", "fit_log", "fit_sqrt", "log_spaced_updates", "squared_grad_norm",
    "two_batch_estimates",
]
