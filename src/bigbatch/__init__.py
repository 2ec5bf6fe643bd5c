"""bigbatch: train neural networks with very large batches without losing accuracy.

Implements *Train longer, generalize better: closing the generalization gap in large batch
training of neural networks* (Hoffer, Hubara, Soudry, NeurIPS 2017): ghost batch normalization,
learning-rate scaling, regime adaptation and the weight-distance ("ultra-slow diffusion")
diagnostic, with a training engine and CLI.

Example:
    >>> import torch, bigbatch
    >>> bn = bigbatch.GhostBatchNorm1d(8, ghost_batch_size=4)
    >>> bn(torch.randn(10, 8)).shape
    torch.Size([10, 8])
"""

from __future__ import annotations

from bigbatch._lazy import lazy_getattr

__version__ = "0.1.0"

# Public names and the module that defines each. Submodules are imported on first use (PEP 562), so
# `import bigbatch` stays cheap and a CLI call only loads what it needs.
_EXPORTS = {
    "ghost_batch_norm": "bigbatch.layers.ghost_bn",
    "GhostBatchNorm": "bigbatch.layers.ghost_bn",
    "GhostBatchNorm1d": "bigbatch.layers.ghost_bn",
    "GhostBatchNorm2d": "bigbatch.layers.ghost_bn",
    "GhostBatchNorm3d": "bigbatch.layers.ghost_bn",
    "convert_ghost_batchnorm": "bigbatch.layers.convert",
    "revert_ghost_batchnorm": "bigbatch.layers.convert",
    "Regime": "bigbatch.recipes.regime",
    "adapt_regime": "bigbatch.recipes.adapt",
    "RegimeScheduler": "bigbatch.recipes.scheduler",
    "LargeBatchSetup": "bigbatch.recipes.loops",
    "large_batch": "bigbatch.recipes.loops",
    "scale_lr": "bigbatch.recipes.scaling",
    "WeightDistance": "bigbatch.diagnostics",
    "load_model": "bigbatch.train.trained",
    "fit_log": "bigbatch.diagnostics",
    "BigBatchError": "bigbatch.errors",
    "ConfigError": "bigbatch.errors",
    "DataError": "bigbatch.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__ = lazy_getattr("bigbatch", _EXPORTS, globals())


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
