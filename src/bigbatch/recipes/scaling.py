"""Learning-rate scaling rules for a batch size B larger (or smaller) than the base batch size B0.

Hoffer et al. 2017 (section 4.1) scale the learning rate by ``sqrt(B / B0)`` so that the covariance
of a weight update matches small-batch training: the noise of an SGD step grows as ``lr**2 / B``,
so keeping ``lr**2 / B`` fixed gives ``lr ∝ sqrt(B)``. Goyal et al. 2017 ("ImageNet in 1 hour")
scale linearly, ``lr ∝ B``, which keeps the *mean* displacement per sample fixed instead.
``"none"`` keeps the lr.
"""

from __future__ import annotations

import math
from numbers import Real

from bigbatch.errors import ConfigError

__all__ = ["SCALING_RULES", "lr_scale_factor", "scale_lr"]

SCALING_RULES = ("sqrt", "linear", "none")


def _check_batch_size(name: str, value: object) -> int:
    # bool is an int subclass; `batch_size=True` is a bug, not a batch of one.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def lr_scale_factor(base_batch_size: int, batch_size: int, rule: str = "sqrt") -> float:
    """The factor multiplying a learning rate tuned at ``base_batch_size`` to use at ``batch_size``.

    Args:
        base_batch_size: the batch size B0 the learning rate was tuned for (128 in the paper).
        batch_size: the batch size B actually used.
        rule: ``"sqrt"`` (``(B / B0) ** 0.5``, the paper), ``"linear"`` (``B / B0``, Goyal et al.)
            or ``"none"`` (1).

    Returns:
        The factor, a float > 0.

    Raises:
        ConfigError: an unknown ``rule`` or a batch size that is not a positive integer.

    Example:
        >>> lr_scale_factor(128, 4096, "sqrt")
        5.656854249492381
        >>> lr_scale_factor(128, 4096, "linear")
        32.0
    """
    _check_batch_size("base_batch_size", base_batch_size)
    _check_batch_size("batch_size", batch_size)
    if rule == "sqrt":
        return math.sqrt(batch_size / base_batch_size)
    if rule == "linear":
        return batch_size / base_batch_size
    if rule == "none":
        return 1.0
    allowed = ", ".join(map(repr, SCALING_RULES))
    raise ConfigError(f"unknown lr scaling rule {rule!r}; allowed: {allowed}")


def scale_lr(lr: float, base_batch_size: int, batch_size: int, rule: str = "sqrt") -> float:
    """Scale a learning rate tuned at ``base_batch_size`` for use at ``batch_size``.

    Args:
        lr: the learning rate at the base batch size (finite, >= 0).
        base_batch_size: the batch size B0 ``lr`` was tuned for.
        batch_size: the batch size B actually used.
        rule: ``"sqrt"`` (Hoffer et al. 2017), ``"linear"`` (Goyal et al. 2017) or ``"none"``.

    Returns:
        ``lr * lr_scale_factor(base_batch_size, batch_size, rule)``.

    Raises:
        ConfigError: a negative or non-finite ``lr``, an unknown ``rule`` or a bad batch size.

    Example:
        >>> scale_lr(0.1, 128, 512)  # x sqrt(4)
        0.2
    """
    if isinstance(lr, bool) or not isinstance(lr, Real) or not math.isfinite(lr) or lr < 0:
        raise ConfigError(f"lr must be a finite number >= 0, got {lr!r}")
    return float(lr) * lr_scale_factor(base_batch_size, batch_size, rule)
