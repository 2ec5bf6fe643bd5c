"""What a measured noise scale says about the batch size (McCandlish et al. 2018, section 2).

Their model of training to a fixed loss: with ``S`` updates and ``E`` examples processed,
``(S / S_min - 1) * (E / E_min - 1) = 1``, solved by ``S = S_min (1 + B_crit / B)`` and
``E = E_min (1 + B / B_crit)`` with the critical batch ``B_crit = E_min / S_min``, which the
gradient noise scale approximates (``B_crit ~ B_noise ~ B_simple``; ``B_simple`` equals
``B_noise`` when the Hessian is a multiple of the identity, and is a proxy otherwise). Well below
``B_crit`` doubling the batch nearly halves the updates at little extra cost in examples; well
above it, doubling the batch nearly doubles the examples and saves few updates.

:func:`advise_batch_size` turns a ``B_simple`` series logged during a run into those numbers and
a verdict in plain words; ``bigbatch advise`` prints :meth:`BatchSizeAdvice.lines`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from bigbatch.recipes.adascale import adascale_gain

__all__ = ["BatchSizeAdvice", "advise_batch_size"]


@dataclass(frozen=True)
class BatchSizeAdvice:
    """The critical batch and what it implies at the run's batch size.

    Attributes:
        b_crit: the critical batch estimate: the median ``B_simple`` over the last half of the
            finite measurements (the noise scale grows as the loss falls, so the late value is
            the one that bounds a useful batch for most of the run).
        b_simple_first: the first finite measurement.
        b_simple_last: the last finite measurement.
        batch_size: the run's batch ``B``.
        base_batch_size: ``B0``, the small batch whose regime the run adapts (or ``None``).
        steps_ratio: ``S / S_min = 1 + B_crit / B``, updates relative to the fewest possible.
        samples_ratio: ``E / E_min = 1 + B / B_crit``, examples relative to the fewest possible.
        doubling_steps_ratio: updates at ``2B`` relative to those at ``B``.
        adascale_gain: AdaScale's gain at ``B`` over ``B0`` for this noise scale (``None``
            without ``base_batch_size``).
        verdict: one sentence in plain words.
    """

    b_crit: float
    b_simple_first: float
    b_simple_last: float
    batch_size: int
    base_batch_size: int | None
    steps_ratio: float
    samples_ratio: float
    doubling_steps_ratio: float
    adascale_gain: float | None
    verdict: str

    def lines(self) -> list[str]:
        """The report ``bigbatch advise`` prints, one line per item."""
        out = [
            f"B_simple: {self.b_simple_first:.4g} at the start, {self.b_simple_last:.4g} at the "
            f"end; critical batch B_crit ~ {self.b_crit:.4g} (median of the last half)",
            f"at B = {self.batch_size}: {self.steps_ratio:.3g} x the fewest updates (S/S_min), "
            f"{self.samples_ratio:.3g} x the fewest examples (E/E_min)",
            f"doubling to B = {2 * self.batch_size} would take {self.doubling_steps_ratio:.3g} x "
            f"the updates",
        ]
        if self.adascale_gain is not None:
            out.append(f"AdaScale gain at B = {self.batch_size} over B0 = {self.base_batch_size}: "
                       f"{self.adascale_gain:.3g} (of at most "
                       f"{self.batch_size / self.base_batch_size:.3g})")
        out.append(self.verdict)
        return out


def _verdict(batch_size: int, b_crit: float) -> str:
    ratio = batch_size / b_crit
    if ratio < 0.5:
        return (f"B = {batch_size} is below the critical batch ({ratio:.2g} x B_crit): a larger "
                f"batch would still cut the updates almost in proportion")
    if ratio > 2.0:
        return (f"B = {batch_size} is above the critical batch ({ratio:.2g} x B_crit): more "
                f"examples per update buy few updates; a smaller batch would cost fewer examples")
    return (f"B = {batch_size} is near the critical batch ({ratio:.2g} x B_crit): a balanced "
            f"trade of updates against examples")


def advise_batch_size(b_simple: Sequence[float], batch_size: int,
                      base_batch_size: int | None = None) -> BatchSizeAdvice:
    """Critical batch, trade-off and AdaScale gain from a run's ``B_simple`` series.

    Args:
        b_simple: ``B_simple`` in the order measured; NaN (no estimate yet) and values <= 0 are
            skipped.
        batch_size: the run's batch size ``B``.
        base_batch_size: the base batch ``B0 <= B`` for the AdaScale gain, or ``None``.

    Returns:
        A :class:`BatchSizeAdvice`.

    Raises:
        ValueError: no finite positive measurement, a bad batch size, or
            ``base_batch_size > batch_size``.

    Example:
        >>> advice = advise_batch_size([float("nan"), 500.0, 900.0, 1000.0], 4000, 250)
        >>> advice.b_crit, advice.steps_ratio, advice.samples_ratio
        (950.0, 1.2375, 5.2105263157894735)
        >>> advice.verdict.startswith("B = 4000 is above the critical batch")
        True
    """
    for name, value in (("batch_size", batch_size), ("base_batch_size", base_batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    values = [float(v) for v in b_simple if math.isfinite(float(v)) and float(v) > 0]
    if not values:
        raise ValueError("no finite, positive B_simple in the series: the noise scale was not "
                         "measured, or the run was too short for |G|^2 to come out positive")
    b_crit = statistics.median(values[len(values) // 2:])
    gain = None if base_batch_size is None else adascale_gain(
        b_crit, 1.0, batch_size, base_batch_size)  # trace / |G|^2 = B_simple
    return BatchSizeAdvice(
        b_crit=b_crit, b_simple_first=values[0], b_simple_last=values[-1],
        batch_size=batch_size, base_batch_size=base_batch_size,
        steps_ratio=1.0 + b_crit / batch_size, samples_ratio=1.0 + batch_size / b_crit,
        doubling_steps_ratio=(1.0 + b_crit / (2 * batch_size)) / (1.0 + b_crit / batch_size),
        adascale_gain=gain, verdict=_verdict(batch_size, b_crit))
