"""Large-batch recipes as pure functions of plain data: lr scaling, regimes and their adaptation.

Hoffer et al. 2017: scale the lr by sqrt(B / B0) (+LR) and train B / B0 times more epochs with every
milestone stretched (+RA), so a large batch takes as many updates as the small batch it replaces.
:class:`RegimeScheduler` applies a regime in any training loop, and :func:`large_batch` turns a
small-batch set-up into the large-batch one in one call.
"""

from __future__ import annotations

from bigbatch._lazy import lazy_getattr
from bigbatch.recipes.adapt import (
    adapt_regime,
    format_adaptation_table,
    num_updates,
    updates_per_epoch,
)
from bigbatch.recipes.optim import apply_settings, build_optimizer
from bigbatch.recipes.regime import SCHEDULES, Regime
from bigbatch.recipes.scaling import SCALING_RULES, lr_scale_factor, scale_lr

__all__ = [
    "SCALING_RULES",
    "SCHEDULES",
    "Regime",
    "adapt_regime",
    "apply_settings",
    "build_optimizer",
    "format_adaptation_table",
    "lr_scale_factor",
    "num_updates",
    "scale_lr",
    "updates_per_epoch",
]

# These need torch at import time; loaded on first use (PEP 562) so that the regime data, which
# the CLI reads before it trains anything, stays importable without it.
_LAZY = {
    "RegimeScheduler": "bigbatch.recipes.scheduler",
    "LargeBatchSetup": "bigbatch.recipes.loops",
    "large_batch": "bigbatch.recipes.loops",
}
__all__ += list(_LAZY)


__getattr__ = lazy_getattr("bigbatch.recipes", _LAZY, globals())
