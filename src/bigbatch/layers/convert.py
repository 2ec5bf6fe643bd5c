"""Swap every batch-norm layer of a model for its ghost counterpart, and back.

Shaped like ``nn.SyncBatchNorm.convert_sync_batchnorm``: recurse over the children, build the new
layer around the *same* Parameter and buffer objects (so optimizers, ``requires_grad``, device and
dtype carry over, and a checkpoint of either model loads into the other), copy ``training``, and
return the module (a new object if the root itself was converted).

Mapping, exact types only (a subclass of ``nn.BatchNorm2d`` may change ``forward``, e.g. fuse an
activation, so it is left alone):

    nn.BatchNorm1d   <->  GhostBatchNorm1d
    nn.BatchNorm2d   <->  GhostBatchNorm2d
    nn.BatchNorm3d   <->  GhostBatchNorm3d
    nn.SyncBatchNorm <->  GhostBatchNorm (rank-agnostic, as SyncBatchNorm is; its input rank
                          is unknown until forward). Ghost statistics are per process, never
                          synchronised; the process group is kept on the layer so that
                          reverting restores it.

``nn.LazyBatchNorm*d`` becomes ``nn.BatchNorm*d`` on its first forward pass and is converted then;
before that it is refused (its number of features is unknown).
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _LazyNormBase

from bigbatch.layers import ghost_bn
from bigbatch.layers.ghost_bn import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    _check_ghost_batch_size,
    _GhostBatchNorm,
)

__all__ = ["convert_ghost_batchnorm", "revert_ghost_batchnorm"]

_TO_GHOST = {
    nn.BatchNorm1d: GhostBatchNorm1d,
    nn.BatchNorm2d: GhostBatchNorm2d,
    nn.BatchNorm3d: GhostBatchNorm3d,
    nn.SyncBatchNorm: GhostBatchNorm,
}
_TO_BATCHNORM = {ghost: bn for bn, ghost in _TO_GHOST.items()}


def _refuse_wrapped(module: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        raise ValueError(
            "cannot convert a DistributedDataParallel-wrapped model: its buffers and gradient "
            "buckets are already registered; convert model.module, then wrap again"
        )


def _refuse_lazy(module: nn.Module) -> None:
    # A materialised nn.LazyBatchNorm2d has become an nn.BatchNorm2d and is converted like one.
    if isinstance(module, _LazyNormBase) and module.has_uninitialized_params():
        raise ValueError(
            f"cannot convert {type(module).__name__}: it has no num_features until its first "
            f"forward pass; run one batch through the model, then call convert_ghost_batchnorm"
        )


def _rebuild(module: nn.Module, cls: type[nn.Module], **kwargs) -> nn.Module:
    """A ``cls`` layer holding ``module``'s own Parameter and buffer objects."""
    if module.bias is None and (ghost_bn._BN_TAKES_BIAS or issubclass(cls, _GhostBatchNorm)):
        kwargs["bias"] = False  # (older nn.BatchNorm has no bias=; the bias None is copied below)
    new = cls(
        module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        device="meta",  # placeholders only: replaced by the original tensors below
        **kwargs,
    )
    new._parameters.clear()
    new._parameters.update(module._parameters)
    new._buffers.clear()
    new._buffers.update(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new.training = module.training
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_ghost_batchnorm(module: nn.Module, ghost_batch_size: int = 128) -> nn.Module:
    """Replace every batch-norm layer in ``module`` with ghost batch norm of ``ghost_batch_size``.

    The model is changed in place (its children are replaced) and returned; if ``module`` is itself
    a batch-norm layer, the new ghost layer is returned instead. Existing ghost layers are kept
    (same object) and set to ``ghost_batch_size``, so converting twice with the same size changes
    nothing and converting again with another size re-sizes every ghost layer.

    Args:
        module: the model (not wrapped in DistributedDataParallel).
        ghost_batch_size: samples per ghost batch.

    Returns:
        The converted model.

    Raises:
        ValueError: for a bad ``ghost_batch_size``, a DistributedDataParallel-wrapped model, or
            an ``nn.LazyBatchNorm*d`` not yet materialised (run one forward pass first).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
        >>> model = convert_ghost_batchnorm(model, ghost_batch_size=32)
        >>> type(model[1]).__name__, model[1].ghost_batch_size
        ('GhostBatchNorm1d', 32)
    """
    _check_ghost_batch_size(ghost_batch_size)
    _refuse_wrapped(module)
    _refuse_lazy(module)
    if isinstance(module, _GhostBatchNorm):
        module.ghost_batch_size = int(ghost_batch_size)
        return module
    output = module
    cls = _TO_GHOST.get(type(module))
    if cls is not None:
        extra = {"process_group": module.process_group} if cls is GhostBatchNorm else {}
        output = _rebuild(module, cls, ghost_batch_size=ghost_batch_size, **extra)
    for name, child in module.named_children():
        output.add_module(name, convert_ghost_batchnorm(child, ghost_batch_size))
    return output


def revert_ghost_batchnorm(module: nn.Module) -> nn.Module:
    """The inverse of ``convert_ghost_batchnorm``: every ghost layer back to its ``nn`` batch norm.

    Same Parameter and buffer objects, ``training`` kept; ``GhostBatchNorm`` becomes
    ``nn.SyncBatchNorm`` with its original process group. Returns the module (a new object if the
    root itself was a ghost layer).

    Raises:
        ValueError: for a DistributedDataParallel-wrapped model.

    Example:
        >>> model = convert_ghost_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), 16)
        >>> type(revert_ghost_batchnorm(model)[0]).__name__
        'BatchNorm2d'
    """
    _refuse_wrapped(module)
    output = module
    cls = _TO_BATCHNORM.get(type(module))
    if cls is not None:
        extra = {"process_group": module.process_group} if cls is nn.SyncBatchNorm else {}
        output = _rebuild(module, cls, **extra)
    for name, child in module.named_children():
        output.add_module(name, revert_ghost_batchnorm(child))
    return output
