"""The opt-in arms of ``bigbatch reproduce`` beyond the paper's five (issue 16).

==============  =====================================================================
LB+GBN+AS       batch ``large_batch_size``, ghost batch norm, AdaScale (``lr_scaling =
                "adascale"``): lr = gain × base lr at its progress tau, the run ends when tau
                reaches SB's updates; the noise scale is measured in micro-batches of
                ``base_batch_size`` (rounded to a multiple of the ghost batch) on every
                ``noise_scale_every``-th update
LB+LARS         LB with the regime's optimizer swapped for LARS (trust coefficient 0.001, the
                regime's momentum and weight decay), peak lr ``[grid] lars_lr`` (default 2.0:
                each layer moves about 0.2 % of its norm per update before momentum), the
                regime's later lrs in the same proportion
LB+LAMB         the same with LAMB (its own betas; momentum dropped), peak lr ``[grid] lamb_lr``
                (default 0.01: about 1 % of each layer's norm per update)
==============  =====================================================================

The defaults are round numbers from the trust-ratio arithmetic above, not tuned; a preset that
uses the arms should set its own. The demo preset does (``lars_lr = 2.0``, ``lamb_lr = 0.02``: the
best of a sweep on it, ``benchmarks/RESULTS.md``).

Example:
    >>> swap_optimizer({"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9},
    ...                 {"epoch": 1, "lr": 0.01}]}, "LAMB", 0.01, ("lr", "weight_decay"))["phases"]
    [{'epoch': 0, 'lr': 0.01}, {'epoch': 1, 'lr': 0.001}]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bigbatch.errors import ConfigError

__all__ = ["LAYERWISE_LRS", "OPT_IN_ARMS", "arm_settings", "check_grid", "layerwise_lr_changes",
           "swap_optimizer"]

OPT_IN_ARMS = {"LB+GBN+AS": "lb_gbn_as", "LB+LARS": "lb_lars", "LB+LAMB": "lb_lamb"}
# The documented peak lrs of the LARS / LAMB arms and the regime settings each optimizer keeps.
_LAYERWISE = {"LB+LARS": ("LARS", "lars_lr", 2.0, ("lr", "momentum", "weight_decay")),
              "LB+LAMB": ("LAMB", "lamb_lr", 0.01, ("lr", "weight_decay"))}
LAYERWISE_LRS = ("lars_lr", "lamb_lr")  # their [grid] keys


def check_grid(grid: Mapping[str, Any]) -> None:
    """Refuse a ``[grid] lars_lr`` / ``lamb_lr`` that is not a number > 0."""
    for key in LAYERWISE_LRS:
        value = grid.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise ConfigError(f"[grid] {key} must be a number > 0, got {value!r}")


def layerwise_lr_changes(before: Mapping[str, Any], after: Mapping[str, Any],
                         arms: Any) -> list[str]:
    """``[grid] lars_lr`` / ``lamb_lr`` changes from grid ``before`` to ``after`` that matter.

    A peak lr counts only for a grid that runs its arm (``arms``: a grid that never ran LB+LAMB
    has no result that another ``lamb_lr`` would change), and an unset one is its default.

    Example:
        >>> old = {"arms": ["SB", "LB+LAMB"], "lars_lr": 1.0}
        >>> layerwise_lr_changes(old, {"lamb_lr": 0.02, "lars_lr": 2.0}, old["arms"])
        ['[grid] lamb_lr: 0.01 -> 0.02']
    """
    changes = []
    for arm, (_, key, default, _) in _LAYERWISE.items():
        old, new = before.get(key, default), after.get(key, default)
        if arm in arms and old != new:
            changes.append(f"[grid] {key}: {old!r} -> {new!r}")
    return changes


def arm_settings(base: Any, grid: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The RunConfig changes of each opt-in arm from the grid's ``base`` RunConfig."""
    from bigbatch.train.config import base_regime_dict

    settings = {"LB+GBN+AS": _adascale(base, grid)}
    for arm, (optimizer, key, default, kept) in _LAYERWISE.items():
        regime = swap_optimizer(base_regime_dict(base), optimizer, float(grid.get(key, default)),
                                kept)
        settings[arm] = {"batch_size": grid["large_batch_size"], "regime": regime}
    return settings


def _adascale(base: Any, grid: Mapping[str, Any]) -> dict[str, Any]:
    """LB+GBN+AS: the large batch, ghost BN, AdaScale; micro-batches of about B0 to measure with."""
    ghost = grid["ghost_batch_size"]
    micro = base.micro_batch_size or max(1, base.base_batch_size // ghost) * ghost
    return {"batch_size": grid["large_batch_size"], "ghost_batch_size": ghost,
            "lr_scaling": "adascale", "noise_scale": True, "micro_batch_size": micro}


def swap_optimizer(regime: dict[str, Any], optimizer: str, peak_lr: float,
                    kept: tuple[str, ...]) -> dict[str, Any]:
    """The regime with ``optimizer``: lrs rescaled so the first is ``peak_lr``; other settings
    that the optimizer does not take (SGD's nesterov, LAMB's missing momentum) dropped."""
    phases = regime.get("phases") or []
    first = next((p["lr"] for p in phases if "lr" in p), None)
    factor = peak_lr / first if first else 1.0
    swapped = []
    for phase in phases:
        new = {k: v for k, v in phase.items() if k == "epoch" or k in kept}
        if "lr" in new:
            new["lr"] = new["lr"] * factor
        swapped.append(new)
    return {**regime, "optimizer": optimizer, "phases": swapped}
