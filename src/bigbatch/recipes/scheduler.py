"""A regime as a ``torch.optim.lr_scheduler``: one ``step()`` per update, in any training loop.

Example:
    >>> import torch
    >>> from bigbatch.recipes import Regime, RegimeScheduler
    >>> regime = Regime.from_dict({"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9},
    ...                                                     {"epoch": 1, "lr": 0.01}]})
    >>> optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
    >>> scheduler = RegimeScheduler(optimizer, regime, updates_per_epoch=3)
    >>> for update in range(4):
    ...     optimizer.step()   # after loss.backward()
    ...     scheduler.step()
    >>> scheduler.get_last_lr()
    [0.01]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from bigbatch.recipes.optim import _group_scales, _scaled_value, apply_settings
from bigbatch.recipes.regime import Regime

__all__ = ["RegimeScheduler"]


class RegimeScheduler(LRScheduler):
    """Applies a :class:`~bigbatch.recipes.Regime` to an optimizer, once per update.

    After ``k`` calls of :meth:`step` (one after each ``optimizer.step()``) the optimizer holds
    ``regime.settings_at(k / updates_per_epoch)``: the lr with the regime's warm-up and step or
    cosine schedule, and every other setting its phases name (momentum, weight decay, betas...).
    Construction applies epoch 0, as every ``torch.optim`` scheduler does.

    Per-group semantics are those of :func:`~bigbatch.recipes.apply_settings`: each param group
    keeps its value relative to the optimizer's defaults (a group made with half the default lr
    follows half the regime's lr, a group with ``weight_decay=0`` stays at 0, a group equal to the
    defaults gets the regime's values exactly). So build the optimizer with the regime's epoch-0
    values as its defaults (``build_optimizer`` does) and give groups their own values on top.

    :meth:`state_dict` is plain data (the regime in its dict form), for
    ``torch.load(weights_only=True)``; :meth:`load_state_dict` restores the update count and
    regime and re-applies the settings of that update, so a resumed run continues exactly.

    Args:
        optimizer: any ``torch.optim`` optimizer whose param groups have every setting the regime
            names (an unknown one is a ``ConfigError``, with a did-you-mean).
        regime: a :class:`~bigbatch.recipes.Regime` or its dict form, usually adapted with
            :func:`~bigbatch.recipes.adapt_regime`.
        updates_per_epoch: updates (optimizer steps) per epoch at the batch size trained with;
            see :func:`~bigbatch.recipes.updates_per_epoch`.
        last_epoch: as in ``torch.optim.lr_scheduler``: the index of the last update (-1: new
            run). Prefer :meth:`load_state_dict` to resume.

    Raises:
        ValueError: ``updates_per_epoch`` is not a positive integer.
        ConfigError: a bad regime, or a setting the optimizer does not have.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, regime: Regime | Mapping[str, Any],
                 updates_per_epoch: int, last_epoch: int = -1) -> None:
        if isinstance(updates_per_epoch, bool) or not isinstance(updates_per_epoch, int) \
                or updates_per_epoch < 1:
            raise ValueError(f"updates_per_epoch must be a positive integer, got "
                             f"{updates_per_epoch!r}; see bigbatch.recipes.updates_per_epoch")
        self.regime = regime if isinstance(regime, Regime) else Regime.from_dict(regime)
        self.updates_per_epoch = updates_per_epoch
        super().__init__(optimizer, last_epoch)

    @property
    def epoch(self) -> float:
        """The fractional epoch of the next update: ``updates done / updates_per_epoch``."""
        return max(self.last_epoch, 0) / self.updates_per_epoch

    def settings(self) -> dict[str, Any]:
        """The regime's settings for the next update (before the per-group ratios)."""
        return self.regime.settings_at(self.epoch)

    def get_lr(self) -> list[float | torch.Tensor]:
        """The lr of each param group for the next update (the regime's lr times its ratio)."""
        lr = self.settings()["lr"]
        scales = _group_scales(self.optimizer, ["lr"])
        return [_scaled_value(lr, scale["lr"], group["lr"])
                for group, scale in zip(self.optimizer.param_groups, scales, strict=True)]

    def step(self, epoch: None = None) -> None:
        """Advance one update and apply its settings (call it after ``optimizer.step()``).

        Raises:
            ValueError: an ``epoch`` argument (deprecated in torch; this scheduler counts updates).
        """
        if epoch is not None:
            raise ValueError("RegimeScheduler.step() takes no epoch: it counts updates; call it "
                             "once after each optimizer.step()")
        super().step()  # counts the update, sets the lr from get_lr() and _last_lr
        self._apply_others()

    def _apply_others(self) -> None:
        apply_settings(self.optimizer, {k: v for k, v in self.settings().items() if k != "lr"})

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the update count, lrs, ``updates_per_epoch`` and the regime as a dict."""
        state = super().state_dict()
        state["regime"] = self.regime.to_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` and put the optimizer at the settings of that update."""
        state = dict(state_dict)
        state["regime"] = Regime.from_dict(state["regime"])
        super().load_state_dict(state)
        apply_settings(self.optimizer, self.settings())
        self._last_lr = [group["lr"].clone() if isinstance(group["lr"], torch.Tensor)
                         else group["lr"] for group in self.optimizer.param_groups]
