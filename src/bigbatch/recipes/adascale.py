"""AdaScale (Johnson, Agrawal, Gu, Guestrin, ICML 2020): lr gain and progress set by the noise.

At a batch ``B = S * B0`` the expected progress of one update is that of ``r`` small-batch updates,
with the *gain ratio*::

    r = (sigma^2 + mu^2) / (sigma^2 / S + mu^2),   sigma^2 = tr(Sigma) / B0,   mu^2 = |G|^2

(``sigma^2`` is the variance of one small-batch gradient; ``tr(Sigma)`` is per example, as
:class:`~bigbatch.diagnostics.GradientNoiseScale` estimates it). Equivalently
``r = (1 + B_simple / B0) / (1 + B_simple / B)``: 1 when the gradient has no noise, ``S`` when it
is all noise. AdaScale uses ``lr_t = r_t * lr_base(tau_t)`` and counts progress
``tau_{t+1} = tau_t + r_t`` in small-batch updates; the base regime (milestones, warm-up) is
followed in ``tau``, and training stops when ``tau`` reaches the small-batch run's number of
updates. Regime adaptation (+RA) is the ``r = 1`` end (as many updates as the small batch), the
fixed-epoch linear rule the ``r = S`` end; AdaScale sits between, where the noise puts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from bigbatch.recipes.regime import Regime

__all__ = ["AdaScale", "adascale_gain"]


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def adascale_gain(trace_sigma: float, grad_sq_norm: float, batch_size: float,
                  base_batch_size: float) -> float:
    """The AdaScale gain ratio ``r`` in ``[1, S]`` for ``S = batch_size / base_batch_size``.

    Negative estimates (early, noisy ones) are clipped to 0 first, so ``r`` stays in ``[1, S]``;
    with both 0 (nothing known) the gain is 1. NaN estimates also give 1.

    Args:
        trace_sigma: per-example ``tr(Sigma)``.
        grad_sq_norm: ``|G|^2``.
        batch_size: ``B``, the batch of the run.
        base_batch_size: ``B0``, the batch whose regime is followed (``B >= B0``).

    Raises:
        ValueError: a batch size that is not > 0, or ``batch_size < base_batch_size``.

    Example:
        >>> adascale_gain(0.0, 1.0, 4096, 128), adascale_gain(1.0, 0.0, 4096, 128)
        (1.0, 32.0)
        >>> round(adascale_gain(128.0, 1.0, 256, 128), 6)  # B_simple = B0: (1 + 1) / (1 + 1/2)
        1.333333
    """
    big = _positive("batch_size", batch_size)
    base = _positive("base_batch_size", base_batch_size)
    if big < base:
        raise ValueError(f"batch_size ({big:g}) must be >= base_batch_size ({base:g})")
    scale = big / base
    var = max(float(trace_sigma), 0.0) / base if math.isfinite(trace_sigma) else 0.0
    sqr = max(float(grad_sq_norm), 0.0) if math.isfinite(grad_sq_norm) else 0.0
    if var + sqr == 0.0:
        return 1.0
    return min(max((var + sqr) / (var / scale + sqr), 1.0), scale)


class AdaScale:
    """Drives a base (small-batch) regime at a larger batch with AdaScale's gain and progress.

    A pure object: the loop asks it for each update's settings and feeds it the gain, e.g. ::

        ada = AdaScale(regime, base_updates_per_epoch=len(small_batch_loader))
        while not ada.done:
            r = noise.gain(batch_size, base_batch_size)  # 1.0 before the first estimate
            apply_settings(optimizer, ada.step(r))
            ...one update...; noise.update(...)

    Args:
        regime: the base batch size's regime (its lr is the small-batch lr; it is not scaled).
        base_updates_per_epoch: updates per epoch at the base batch size; ``tau`` is converted to
            epochs of the base regime with it.

    Attributes:
        tau: progress so far, in small-batch updates.
        num_updates: updates taken so far (calls to :meth:`step`).
        total_tau: the small-batch run's number of updates, ``regime.epochs *
            base_updates_per_epoch``; training is done when ``tau`` reaches it.

    Example:
        >>> r = Regime.from_dict({"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1},
        ...                                                {"epoch": 1, "lr": 0.01}]})
        >>> ada = AdaScale(r, base_updates_per_epoch=4)  # 8 small-batch updates in all
        >>> [round(ada.step(2.0)["lr"], 6) for _ in range(4)], ada.done
        ([0.2, 0.2, 0.02, 0.02], True)
    """

    def __init__(self, regime: Regime, base_updates_per_epoch: int) -> None:
        if not isinstance(regime, Regime):
            raise ValueError(f"regime must be a Regime, got {type(regime).__name__}")
        if isinstance(base_updates_per_epoch, bool) or not isinstance(base_updates_per_epoch, int) \
                or base_updates_per_epoch < 1:
            raise ValueError(f"base_updates_per_epoch must be an integer >= 1, got "
                             f"{base_updates_per_epoch!r}")
        self.regime = regime
        self.base_updates_per_epoch = base_updates_per_epoch
        self.total_tau = regime.epochs * base_updates_per_epoch
        self.tau = 0.0
        self.num_updates = 0
        self.last_gain = 1.0

    @property
    def done(self) -> bool:
        """``tau`` has reached the small-batch run's number of updates (a 1e-9 relative slack)."""
        return self.tau >= self.total_tau * (1.0 - 1e-9)

    @property
    def epoch(self) -> float:
        """Progress in epochs of the base regime, ``tau / base_updates_per_epoch``."""
        return self.tau / self.base_updates_per_epoch

    def step(self, gain: float) -> dict[str, Any]:
        """The settings for the next update (lr times ``gain``), then ``tau += gain``.

        Args:
            gain: this update's gain ratio ``r_t`` (>= 1 as :func:`adascale_gain` returns it;
                any finite value > 0 is accepted).

        Returns:
            ``regime.settings_at(tau_t / base_updates_per_epoch)`` with ``lr`` multiplied by
            ``gain``, ready for :func:`~bigbatch.recipes.apply_settings`.

        Raises:
            ValueError: a gain that is not a finite number > 0.
        """
        gain = _positive("gain", gain)
        settings = self.regime.settings_at(self.epoch)
        settings["lr"] = settings["lr"] * gain
        self.tau += gain
        self.num_updates += 1
        self.last_gain = gain
        return settings

    def state_dict(self) -> dict[str, float | int]:
        """Progress as plain numbers (a ``weights_only`` checkpoint loads it)."""
        return {"tau": self.tau, "num_updates": self.num_updates, "last_gain": self.last_gain,
                "total_tau": self.total_tau}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly.

        Raises:
            ValueError: a missing key, or a checkpoint made for another regime length.
        """
        missing = sorted({"tau", "num_updates", "last_gain", "total_tau"} - set(state_dict))
        if missing:
            raise ValueError(f"AdaScale state is missing {missing}: not an AdaScale state_dict")
        if float(state_dict["total_tau"]) != self.total_tau:
            raise ValueError(
                f"the checkpoint's AdaScale run lasts {state_dict['total_tau']:g} small-batch "
                f"updates, this one {self.total_tau:g}: resume with the same regime and data")
        self.tau = float(state_dict["tau"])
        self.num_updates = int(state_dict["num_updates"])
        self.last_gain = float(state_dict["last_gain"])
