"""Ghost Batch Normalization (Hoffer, Hubara, Soudry 2017, Algorithm 1): the functional and modules.

In training, ``GhostBatchNorm*d(x)`` equals applying the matching ``nn.BatchNorm*d`` (same weight,
bias and buffers) to each slice of ``x.split(ghost_batch_size)`` in order and concatenating the
results: outputs, gradients, ``running_mean``, ``running_var`` and ``num_batches_tracked`` all
match, including a shorter last ghost batch, ``momentum=None``, ``track_running_stats=False`` and an
empty batch. In evaluation it *is* ``nn.BatchNorm*d``. ``tests/test_ghost_bn.py`` proves this
against ``tests/reference.py``.

How it is fast. The official code runs forward and backward once per ghost batch. Here one custom
autograd Function (``_function.py``) handles every ghost batch at once, by one of three backends
(``backend.py``; ``BIGBATCH_GBN_BACKEND=auto|c|triton|torch``): fused C kernels on CPU
(``ghost_bn_cpu.c``, 0.5-1.0x the time of ``nn.BatchNorm``, benchmarks/RESULTS.md), Triton kernels
on CUDA (``_triton_kernel.py``), or a few whole-tensor PyTorch ops over a ``(k, g, ...)`` view of
the batch. Under ``torch.compile`` the Triton path is a custom op (``_triton_op.py``) and the other
paths trace plain differentiable ops. The running statistics after k ghost batches are applied in
closed form (``_running_stats.py``) instead of k sequential updates.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bigbatch.layers import _running_stats, _triton_op, backend
from bigbatch.layers._function import GhostBatchNormFunction, forward_ops
from bigbatch.layers._layout import memory_format

__all__ = [
    "ghost_batch_norm",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]


def _check_ghost_batch_size(ghost_batch_size: object) -> None:
    if (
        isinstance(ghost_batch_size, bool)
        or not isinstance(ghost_batch_size, numbers.Integral)
        or ghost_batch_size < 1
    ):
        raise ValueError(
            f"ghost_batch_size must be a positive int (samples per ghost batch), got "
            f"{ghost_batch_size!r}; the paper uses 128"
        )


def _check_single_value(x: Tensor, ghost_batch_size: int) -> None:
    """Refuse a ghost batch with one value per channel (as nn.BatchNorm does), saying what to do."""
    n = x.shape[0]
    values_per_sample = math.prod(x.shape[2:])
    last = n - (-(-n // ghost_batch_size) - 1) * ghost_batch_size
    if last * values_per_sample != 1:
        return
    if n == 1:
        raise ValueError(
            f"a batch of 1 sample with no spatial positions has a single value per channel, "
            f"which batch norm cannot normalise in training (ghost_batch_size={ghost_batch_size}); "
            f"use a batch of at least 2 samples"
        )
    if ghost_batch_size == 1:
        raise ValueError(
            f"ghost_batch_size=1 gives ghost batches of 1 sample with a single value per channel, "
            f"which batch norm cannot normalise in training (batch of {n}); use "
            f"ghost_batch_size >= 2"
        )
    raise ValueError(
        f"a batch of {n} with ghost_batch_size={ghost_batch_size} leaves a last ghost batch of 1 "
        f"sample (a single value per channel), which batch norm cannot normalise in training; use "
        f"a ghost size that divides the batch or leaves a remainder of at least 2 samples, or a "
        f"batch size that is not 1 more than a multiple of {ghost_batch_size}"
    )


def _check_rank(x: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(
            f"ghost_batch_norm expects an input of shape (N, C, *), got {x.dim()}-d shape "
            f"{tuple(x.shape)}; add a batch dimension"
        )


def _empty_batch(x, running_mean, running_var, weight, bias, ghost_batch_size, eps, nbt):
    """No values (N = 0 or a zero-sized spatial dim): as nn.BatchNorm on each empty slice, an empty
    output and unchanged running statistics; each slice (one for N = 0) still counts as a batch."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.0, eps)
    if running_mean is not None and running_var is not None and nbt is not None:
        nbt.add_(max(1, -(-x.shape[0] // ghost_batch_size)))
    return y


def _one_ghost_batch(x, running_mean, running_var, weight, bias, momentum, eps, nbt):
    """A batch no larger than one ghost batch: exactly nn.BatchNorm.

    momentum=None is done in closed form (no ``.item()``, so torch.compile keeps one graph):
    momentum=1 copies the batch statistics into scratch buffers.
    """
    if running_mean is None or running_var is None:
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if momentum is not None:
        if nbt is not None:
            nbt.add_(1)
        return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
    batch_mean, batch_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
    y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
    with torch.no_grad():
        _running_stats.update_running_stats(
            running_mean, running_var, batch_mean[None], batch_var[None], None, nbt
        )
    return y


def _ghost_forward(x, weight, bias, ghost_batch_size: int, eps: float):
    """(y, per-ghost means, per-ghost biased variances) by the backend ``backend.choose`` picks."""
    choice = backend.choose(x)
    fmt = memory_format(x)
    if torch.compiler.is_compiling():
        if choice.name == "triton" and _triton_op.AVAILABLE:
            xc = x.contiguous(memory_format=fmt)
            y, mean, var, _ = _triton_op.ghost_bn_forward(xc, weight, bias, ghost_batch_size, eps)
            return y, mean, var
        return forward_ops(x, weight, bias, ghost_batch_size, eps)
    backend.warn_fallback(choice)
    return GhostBatchNormFunction.apply(
        x.contiguous(memory_format=fmt), weight, bias, ghost_batch_size, eps, choice.name
    )


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    ghost_batch_size: int,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: Tensor | None = None,
) -> Tensor:
    """Batch norm with statistics from consecutive ghost batches of ``ghost_batch_size`` samples.

    In training this equals ``F.batch_norm`` applied to each slice of ``x.split(ghost_batch_size)``
    in turn (running statistics updated once per ghost batch, in order) and the results
    concatenated; a batch no larger than one ghost batch is plain ``F.batch_norm``. In evaluation
    (``training=False``) it is ``F.batch_norm`` with the running statistics.

    Args:
        x: input ``(N, C, *)``; contiguous or channels_last.
        running_mean, running_var: ``(C,)`` buffers updated in place in training, or None to not
            track.
        weight, bias: optional ``(C,)`` affine parameters.
        ghost_batch_size: samples per ghost batch (the last one may be shorter).
        training: use (ghost) batch statistics and update the running ones.
        momentum: weight of each ghost batch in the running statistics,
            ``r = (1 - m) r + m s``, as in ``nn.BatchNorm``; None for a cumulative average
            (needs ``num_batches_tracked``).
        eps: added to the variance.
        num_batches_tracked: optional counter buffer, increased by the number of ghost batches.

    Returns:
        Tensor of the shape, dtype and memory format of ``x``.

    Raises:
        ValueError: for a bad ``ghost_batch_size``, an input of rank < 2, a ghost batch with a
            single value per channel in training, or ``training=False`` without running
            statistics.

    Example:
        >>> x = torch.randn(6, 3)
        >>> y = ghost_batch_norm(x, None, None, ghost_batch_size=3, training=True)
        >>> torch.allclose(y[:3], F.batch_norm(x[:3], None, None, training=True), atol=1e-6)
        True
    """
    _check_ghost_batch_size(ghost_batch_size)
    _check_rank(x)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "ghost_batch_norm with training=False normalises with the running statistics; pass "
                "running_mean and running_var, or training=True to use batch statistics"
            )
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    stats = (running_mean, running_var)
    if x.numel() == 0:
        return _empty_batch(x, *stats, weight, bias, ghost_batch_size, eps, num_batches_tracked)
    _check_single_value(x, ghost_batch_size)
    if x.shape[0] <= ghost_batch_size:
        return _one_ghost_batch(x, *stats, weight, bias, momentum, eps, num_batches_tracked)
    y, batch_mean, batch_var = _ghost_forward(x, weight, bias, ghost_batch_size, eps)
    if running_mean is not None and running_var is not None:
        _running_stats.track(
            x, batch_mean, batch_var, *stats, ghost_batch_size, momentum, num_batches_tracked
        )
    return y


# nn.BatchNorm's keyword-only ``bias`` is recent (torch 2.13 has it, 2.11 has not); bigbatch
# supports torch >= 2.3.
_BN_TAKES_BIAS = "bias" in inspect.signature(_BatchNorm.__init__).parameters


class _GhostBatchNorm(_BatchNorm):
    """Shared body of the ghost batch-norm modules: a thin shell over ``ghost_batch_norm``."""

    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        ghost_batch_size: int = 128,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        _check_ghost_batch_size(ghost_batch_size)
        args = (num_features, eps, momentum, affine, track_running_stats, device, dtype)
        if _BN_TAKES_BIAS:
            super().__init__(*args, bias=bias)
        else:  # older torch: nn.BatchNorm always has a bias; drop it as newer versions do
            super().__init__(*args)
            if affine and not bias:
                self.register_parameter("bias", None)
        self.ghost_batch_size = int(ghost_batch_size)

    def reset_parameters(self) -> None:
        # As _BatchNorm's, but also for an affine layer without bias on any torch version.
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            if self.bias is not None:
                nn.init.zeros_(self.bias)

    def _check_input_dim(self, input: Tensor) -> None:
        if self._ranks and input.dim() not in self._ranks:
            expected = " or ".join(f"{r}-d" for r in self._ranks)
            raise ValueError(
                f"{type(self).__name__} expects {expected} input, got {input.dim()}-d shape "
                f"{tuple(input.shape)}; use the GhostBatchNorm class matching your input's rank"
            )
        if input.dim() < 2:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (N, C, *), got {input.dim()}-d"
            )

    def __prepare_scriptable__(self):
        # torch.jit.script cannot compile the training path (backend choice, custom Function);
        # say what works instead of failing deep inside the scripting compiler.
        raise TypeError(
            f"torch.jit.script cannot compile {type(self).__name__}; export the model with "
            f"torch.export.export or torch.onnx.export instead (both work), or script "
            f"revert_ghost_batchnorm(model) for an evaluation-only copy"
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        _check_ghost_batch_size(self.ghost_batch_size)
        if not self.training:
            # Evaluation is exactly nn.BatchNorm: running statistics, or whole-batch statistics when
            # none are tracked (track_running_stats=False).
            use_batch_stats = self.running_mean is None and self.running_var is None
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                use_batch_stats, 0.0, self.eps,
            )  # fmt: skip
        track = self.track_running_stats
        return ghost_batch_norm(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            ghost_batch_size=self.ghost_batch_size,
            training=True,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=self.num_batches_tracked if track else None,
        )


_DOC_TEMPLATE = r"""Ghost batch normalization over {shape} input (Hoffer et al. 2017, Algorithm 1).

    In training, equals ``{bn}`` (same parameters and buffers) applied to each slice of
    ``x.split(ghost_batch_size)`` in turn: each ghost batch is normalised with its own mean and
    biased variance, and the running statistics are updated once per ghost batch, in order (so
    ``num_batches_tracked`` grows by the number of ghost batches). The last ghost batch may be
    shorter. In evaluation it is ``{bn}``. Parameters, buffers and ``state_dict`` keys are those of
    ``{bn}``, so checkpoints load both ways.

    Args:
        num_features: C, the number of channels.
        ghost_batch_size: samples per ghost batch; 128 in the paper.
        eps: added to the variance for numerical stability.
        momentum: weight of a ghost batch's statistics in the running ones, ``r = (1 - m) r + m s``
            (as in PyTorch, the opposite of the optimizer convention); None for a cumulative
            average.
        affine: learn a per-channel weight and bias.
        track_running_stats: keep running statistics for evaluation; if False, batch statistics are
            used in evaluation too (over the whole batch, as ``{bn}`` does).
        device, dtype: factory kwargs for the parameters and buffers.
        bias: keyword-only; False drops the learnable bias (as in ``nn.BatchNorm``).

    Shape:
        - Input: {shape}
        - Output: same shape, dtype and memory format as the input.

    Raises:
        ValueError: for a bad ``ghost_batch_size``, a wrong input rank, or a ghost batch with a
            single value per channel in training.

    Example:
        >>> m = {name}(4, ghost_batch_size=8)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
    """


class GhostBatchNorm1d(_GhostBatchNorm):
    _ranks = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    _ranks = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    _ranks = (5,)


class GhostBatchNorm(_GhostBatchNorm):
    """Rank-agnostic ghost batch norm: the counterpart of ``nn.SyncBatchNorm`` in the converter.

    Accepts any input ``(N, C, *)``, like ``nn.SyncBatchNorm``. Ghost statistics are computed on
    each process's own samples and never synchronised: a ghost batch lies inside one process's
    batch, which is the point of ghost batch norm. ``process_group`` is kept only so that
    ``revert_ghost_batchnorm`` restores the original ``nn.SyncBatchNorm``.
    """

    def __init__(self, *args, process_group=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.process_group = process_group


for _cls, _bn, _shape, _example in (
    (GhostBatchNorm1d, "nn.BatchNorm1d", "(N, C) or (N, C, L)", "16, 4"),
    (GhostBatchNorm2d, "nn.BatchNorm2d", "(N, C, H, W)", "16, 4, 3, 3"),
    (GhostBatchNorm3d, "nn.BatchNorm3d", "(N, C, D, H, W)", "16, 4, 2, 3, 3"),
):
    _cls.__doc__ = _DOC_TEMPLATE.format(shape=_shape, bn=_bn, name=_cls.__name__, example=_example)
del _cls, _bn, _shape, _example
