"""Layers: ghost batch normalization, and the converter that puts it into a model and back."""

from bigbatch.layers._cpu_kernel import status as cpu_kernel_status
from bigbatch.layers.backend import BackendChoice, backend_for, backend_summary
from bigbatch.layers.convert import convert_ghost_batchnorm, revert_ghost_batchnorm
from bigbatch.layers.ghost_bn import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    ghost_batch_norm,
)

__all__ = [
    "BackendChoice",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "backend_for",
    "backend_summary",
    "convert_ghost_batchnorm",
    "cpu_kernel_status",
    "ghost_batch_norm",
    "revert_ghost_batchnorm",
]
