"""Large-batch adaptation of a regime (+LR, +RA, warm-up) and counting the updates of a run.

:func:`adapt_regime` applies the paper's two regime-level measures: learning-rate scaling (+LR)
and regime adaptation (+RA, train B/B0 times more epochs with every milestone stretched by the same
factor, so the *number of updates* matches small-batch training), plus an optional Goyal et al.
warm-up. :func:`updates_per_epoch` and :func:`num_updates` count the updates that result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from bigbatch.errors import ConfigError
from bigbatch.recipes.regime import Regime, _number
from bigbatch.recipes.scaling import lr_scale_factor

__all__ = ["adapt_regime", "format_adaptation_table", "num_updates", "updates_per_epoch"]

logger = logging.getLogger(__name__)


# -- counting updates -----------------------------------------------------------------------------
def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def updates_per_epoch(dataset_size: int, batch_size: int) -> int:
    """``ceil(dataset_size / batch_size)``: the last, partial batch of an epoch is kept.

    Example:
        >>> updates_per_epoch(50000, 4096)
        13
    """
    n = _positive_int("dataset_size", dataset_size)
    b = _positive_int("batch_size", batch_size)
    return -(-n // b)


def num_updates(regime: Regime, dataset_size: int, batch_size: int) -> int:
    """Total updates of a run: ``regime.epochs * updates_per_epoch`` rounded to the nearest integer.

    Halves round up, and a relative tolerance of 1e-9 absorbs float noise from rescaled epochs
    (``2.5 * 4096 / 128``), so two regimes whose exact update counts agree always count the same.
    """
    x = regime.epochs * updates_per_epoch(dataset_size, batch_size)
    return math.floor(x + 0.5 + 1e-9 * max(1.0, x))


def _samples(num: int, dataset_size: int, batch_size: int) -> int:
    """Samples seen in ``num`` updates when every epoch ends with a partial batch."""
    per_epoch = updates_per_epoch(dataset_size, batch_size)
    full, rest = divmod(num, per_epoch)
    return full * dataset_size + min(dataset_size, rest * batch_size)


# -- large-batch adaptation -----------------------------------------------------------------------
def _epoch_factor(regime_adaptation: bool | float, base_batch_size: int, batch_size: int) -> float:
    if isinstance(regime_adaptation, bool):
        return batch_size / base_batch_size if regime_adaptation else 1.0
    return _number("regime_adaptation", regime_adaptation, low=0.0, low_ok=False)


def adapt_regime(
    regime: Regime | Mapping[str, Any],
    base_batch_size: int,
    batch_size: int,
    lr_scaling: str = "sqrt",
    regime_adaptation: bool | float = True,
    warmup_epochs: float = 0.0,
) -> Regime:
    """Adapt a regime tuned at ``base_batch_size`` to ``batch_size`` (Hoffer et al. 2017: +LR, +RA).

    * **+LR**: the lr of every phase is multiplied by ``lr_scale_factor(base_batch_size,
      batch_size, lr_scaling)`` (``sqrt(B / B0)`` for the paper).
    * **+RA**: epochs, every milestone and an existing warm-up are multiplied by ``B / B0`` when
      ``regime_adaptation`` is True, by the number itself when it is a float, and kept when False.
      The factor is the exact ratio B/B0, not the official code's ``ceil(B / B0)``: with it the
      number of updates ``epochs * ceil(N / B)`` equals the base regime's up to the rounding of the
      last, partial batch of each epoch (exactly when B0 and B both divide N; in general the
      difference is ``epochs * (((-N) mod B) - ((-N) mod B0)) / B0`` updates, +-1), while ``ceil``
      would train up to twice as long for a batch size that is not a multiple of B0.
    * **warm-up**: ``warmup_epochs > 0`` (in epochs of the *adapted* regime) replaces any warm-up
      with a linear ramp from the base-batch lr to the scaled lr (``warmup_start_factor = 1 / lr
      factor``, Goyal et al. 2017). Without lr scaling up, the two lrs coincide and the ramp is
      flat. ``warmup_epochs = 0`` keeps the input's own warm-up (stretched with the other epochs).

    The input is never modified (a :class:`Regime` is immutable; a dict is only read).

    Args:
        regime: a :class:`Regime` or its dict form.
        base_batch_size: the batch size B0 the regime was tuned for.
        batch_size: the batch size B to train with.
        lr_scaling: ``"sqrt"``, ``"linear"`` or ``"none"``.
        regime_adaptation: True (x B/B0), False (x1) or a factor > 0 for epochs and milestones.
        warmup_epochs: warm-up length in adapted epochs, >= 0 and <= the adapted epochs.

    Returns:
        A new :class:`Regime`.

    Raises:
        ConfigError: bad batch sizes, scaling rule, adaptation factor or warm-up.

    Example:
        >>> base = {"epochs": 5, "phases": [{"epoch": 0, "lr": 0.1}, {"epoch": 3, "lr": 0.01}]}
        >>> r = adapt_regime(base, 128, 512)
        >>> r.epochs, r.milestones, r.phases[0]["lr"]
        (20.0, (12.0,), 0.2)
    """
    if not isinstance(regime, Regime):
        regime = Regime.from_dict(regime)
    lr_factor = lr_scale_factor(base_batch_size, batch_size, lr_scaling)
    adapted = regime.scale_epochs(_epoch_factor(regime_adaptation, base_batch_size, batch_size))
    phases = tuple({**p, "lr": p["lr"] * lr_factor} if "lr" in p else p for p in adapted.phases)
    warmup = _number("warmup_epochs", warmup_epochs, low=0.0)
    if warmup > 0:
        start = min(1.0, 1.0 / lr_factor)
        if start == 1.0:
            logger.info("warm-up of %g epochs is flat: the lr is not scaled up (factor %g)",
                        warmup, lr_factor)
        return dataclasses.replace(adapted, phases=phases, warmup_epochs=warmup,
                                   warmup_start_factor=start)
    return dataclasses.replace(adapted, phases=phases)


def format_adaptation_table(
    before: Regime | Mapping[str, Any],
    after: Regime | Mapping[str, Any],
    *,
    base_batch_size: int,
    batch_size: int,
    dataset_size: int,
) -> str:
    """A plain-text table comparing a small-batch regime with its large-batch adaptation.

    Rows: batch size, schedule, lr of each phase (with its start epoch), epochs, milestones,
    warm-up, updates per epoch, number of updates and samples processed (every epoch's last batch
    is partial).

    Example:
        >>> base = Regime.from_dict({"epochs": 5, "phases": [{"epoch": 0, "lr": 0.1}]})
        >>> print(format_adaptation_table(base, adapt_regime(base, 128, 512), base_batch_size=128,
        ...                               batch_size=512, dataset_size=1024))
                           small batch  large batch
        batch size         128          512
        schedule           step         step
        lr, phase 1        0.1 @ ep 0   0.2 @ ep 0
        epochs             5            20
        milestones         -            -
        warm-up            -            -
        updates per epoch  8            2
        number of updates  40           40
        samples processed  5120         20480
    """
    before = before if isinstance(before, Regime) else Regime.from_dict(before)
    after = after if isinstance(after, Regime) else Regime.from_dict(after)

    def column(r: Regime, b: int) -> list[str]:
        n = num_updates(r, dataset_size, b)
        lrs = [f"{p['lr']:.6g} @ ep {p['epoch']:g}" if "lr" in p else f"(kept) @ ep {p['epoch']:g}"
               for p in r.phases]
        warm = (f"{r.warmup_epochs:g} ep from x{r.warmup_start_factor:.3g}"
                if r.warmup_epochs > 0 else "-")
        return [str(b), r.schedule, *lrs + [""] * (num_phases - len(lrs)), f"{r.epochs:g}",
                ", ".join(f"{m:g}" for m in r.milestones) or "-", warm,
                str(updates_per_epoch(dataset_size, b)), str(n), str(_samples(n, dataset_size, b))]

    num_phases = max(len(before.phases), len(after.phases))
    labels = ["batch size", "schedule", *[f"lr, phase {i + 1}" for i in range(num_phases)],
              "epochs", "milestones", "warm-up", "updates per epoch", "number of updates",
              "samples processed"]
    left, right = column(before, base_batch_size), column(after, batch_size)
    widths = [max(map(len, col)) + 2 for col in (labels, left + ["small batch"])]
    lines = [f"{'':<{widths[0]}}{'small batch':<{widths[1]}}large batch"]
    rows = zip(labels, left, right, strict=True)
    lines += [f"{a:<{widths[0]}}{b:<{widths[1]}}{c}" for a, b, c in rows]
    return "\n".join(line.rstrip() for line in lines)
