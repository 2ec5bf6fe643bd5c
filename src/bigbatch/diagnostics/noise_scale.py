"""The gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018).

``G`` is the true gradient and ``Sigma`` the covariance of one example's gradient. Neither is
observed, but two squared gradient norms at different batch sizes give unbiased estimates of both
(McCandlish et al. 2018, appendix A.1). With ``E|g_B|^2 = |G|^2 + tr(Sigma) / B`` for the mean
gradient ``g_B`` of ``B`` independent examples, the squared norms ``|g_s|^2`` at ``B_s`` and
``|g_b|^2`` at ``B_b > B_s`` solve to::

    |G|^2     ~ (B_b |g_b|^2 - B_s |g_s|^2) / (B_b - B_s)
    tr(Sigma) ~ (|g_s|^2 - |g_b|^2) / (1 / B_s - 1 / B_b)

Both are linear in the squared norms, so averaging them over updates keeps them unbiased; their
ratio is not linear, so ``B_simple`` is the ratio of the two averages, never an average of
per-update ratios (a single update's ``|G|^2`` estimate is often negative).

:func:`estimate_noise_scale` is a one-shot estimate for a model and some batches;
:class:`GradientNoiseScale` is the online estimator any training loop feeds;
:func:`two_batch_estimates` is the formula above; :func:`squared_grad_norm` is the cheap norm the
loop needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "GradientNoiseScale", "NoiseScaleEstimate", "estimate_noise_scale", "squared_grad_norm",
    "two_batch_estimates",
]


def _batch_sizes(small_batch_size: float, big_batch_size: float) -> tuple[float, float]:
    for name, value in (("small_batch_size", small_batch_size), ("big_batch_size", big_batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not big_batch_size > small_batch_size:
        raise ValueError(
            f"big_batch_size ({big_batch_size:g}) must exceed small_batch_size "
            f"({small_batch_size:g}): two equal batch sizes carry no information about the noise; "
            f"use micro-batches or several processes for the small batch")
    return float(small_batch_size), float(big_batch_size)


def two_batch_estimates(small_sq_norm: float, small_batch_size: float, big_sq_norm: float,
                        big_batch_size: float) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from two squared gradient norms (module docstring).

    Args:
        small_sq_norm: ``|g_s|^2`` of a mean gradient over ``small_batch_size`` examples (or the
            mean of several such squared norms, which lowers the variance).
        small_batch_size: ``B_s``.
        big_sq_norm: ``|g_b|^2`` of a mean gradient over ``big_batch_size`` examples.
        big_batch_size: ``B_b > B_s``.

    Returns:
        ``(grad_sq_norm, trace_sigma)`` for this one measurement. Either may be negative: only
        their averages over many measurements are meaningful.

    Raises:
        ValueError: a batch size that is not > 0, or ``big_batch_size <= small_batch_size``.

    Example:
        >>> two_batch_estimates(3.0, 1, 1.2, 10)  # |G|^2 = 1, tr(Sigma) = 2
        (1.0, 2.0)
    """
    b_s, b_b = _batch_sizes(small_batch_size, big_batch_size)
    small, big = float(small_sq_norm), float(big_sq_norm)
    grad_sq = (b_b * big - b_s * small) / (b_b - b_s)
    trace = (small - big) / (1.0 / b_s - 1.0 / b_b)
    return grad_sq, trace


def squared_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum |p.grad|^2`` over the parameters that have a gradient, as a 0-d tensor.

    One fused ``torch._foreach_norm`` per device and dtype, then a single sum; nothing is copied
    to the host, so on a GPU this does not synchronise (call ``float()`` when the value is
    needed). The result is float32, or float64 when a gradient is float64; half-precision
    gradients are squared and summed in float32.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> float(squared_grad_norm([w]))
        25.0
    """
    return _sum_of_squares([p.grad for p in parameters if p.grad is not None])


def _sum_of_squares(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    import torch

    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    out = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    parts = []
    for (_, dtype), group in groups.items():
        wide = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        norms = torch._foreach_norm(group, 2, dtype=wide) if wide != dtype \
            else torch._foreach_norm(group, 2)
        parts.append(torch.stack(norms).to(device=device, dtype=out).square().sum())
    return torch.stack(parts).sum()


class GradientNoiseScale:
    """Online estimate of ``|G|^2``, ``tr(Sigma)`` and ``B_simple`` for a training loop.

    Call :meth:`update` once per update with the two squared norms. Each running value is an
    exponential moving average with weight ``decay`` on the past, **bias-corrected** as in Adam
    (divided by ``1 - decay**n`` after ``n`` updates), so it is an unbiased weighted mean of the
    measurements from the first update on, not pulled towards 0. ``decay=0.99`` averages over
    roughly the last 100 updates; the single-update estimates are very noisy, so do not go much
    lower. ``decay=1.0`` keeps the plain mean of every update (for a one-shot estimate).

    Args:
        decay: weight of the past in the moving averages, in [0, 1].

    Example:
        >>> gns = GradientNoiseScale(decay=0.9)
        >>> gns.update(small_sq_norm=3.0, small_batch_size=1, big_sq_norm=1.2, big_batch_size=10)
        >>> gns.grad_sq_norm, gns.trace_sigma, gns.b_simple
        (1.0, 2.0, 2.0)
    """

    def __init__(self, decay: float = 0.99) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) \
                or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.decay = float(decay)
        self._grad_sq = 0.0  # sum of weighted |G|^2 measurements (uncorrected EMA if decay < 1)
        self._trace = 0.0
        self._weight = 0.0  # the bias correction: 1 - decay**n, or n when decay == 1
        self.num_updates = 0

    def update(self, small_sq_norm: float, small_batch_size: float, big_sq_norm: float,
               big_batch_size: float) -> None:
        """Add one measurement; arguments as in :func:`two_batch_estimates`.

        Tensors are accepted (``float()`` is taken, which synchronises a GPU once per call).

        Raises:
            ValueError: bad batch sizes (see :func:`two_batch_estimates`) or a non-finite norm
                (an overflowed fp16 gradient: skip the update instead).
        """
        small, big = float(small_sq_norm), float(big_sq_norm)
        if not (math.isfinite(small) and math.isfinite(big)):
            raise ValueError(f"squared norms must be finite, got {small} and {big}; skip updates "
                             f"whose gradients overflowed")
        grad_sq, trace = two_batch_estimates(small, small_batch_size, big, big_batch_size)
        # decay == 1 sums with equal weights (the plain mean after the correction).
        keep, new = (self.decay, 1.0 - self.decay) if self.decay < 1.0 else (1.0, 1.0)
        self._grad_sq = keep * self._grad_sq + new * grad_sq
        self._trace = keep * self._trace + new * trace
        self._weight = keep * self._weight + new
        self.num_updates += 1

    @property
    def grad_sq_norm(self) -> float:
        """The running ``|G|^2`` estimate (NaN before the first update; may be <= 0 early on)."""
        return self._grad_sq / self._weight if self._weight > 0 else math.nan

    @property
    def trace_sigma(self) -> float:
        """The running ``tr(Sigma)`` estimate, per example (NaN before the first update)."""
        return self._trace / self._weight if self._weight > 0 else math.nan

    @property
    def b_simple(self) -> float:
        """``trace_sigma / grad_sq_norm``; NaN before the first update or while ``|G|^2 <= 0``."""
        grad_sq = self.grad_sq_norm
        return self.trace_sigma / grad_sq if grad_sq > 0 else math.nan

    def gain(self, batch_size: float, base_batch_size: float) -> float:
        """The AdaScale gain at ``batch_size`` over ``base_batch_size`` from the running values.

        ``1.0`` before the first update. See :func:`bigbatch.recipes.adascale.adascale_gain`.
        """
        from bigbatch.recipes.adascale import adascale_gain

        if self.num_updates == 0:
            return 1.0
        return adascale_gain(self.trace_sigma, self.grad_sq_norm, batch_size, base_batch_size)

    def state_dict(self) -> dict[str, float | int]:
        """Every running value, as plain Python numbers (a ``weights_only`` checkpoint loads it)."""
        return {"decay": self.decay, "grad_sq": self._grad_sq, "trace": self._trace,
                "weight": self._weight, "num_updates": self.num_updates}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` exactly (the resumed run continues bit for bit).

        Raises:
            ValueError: a key is missing, or the checkpoint's decay differs from this object's.
        """
        missing = sorted({"decay", "grad_sq", "trace", "weight", "num_updates"} - set(state_dict))
        if missing:
            raise ValueError(f"noise-scale state is missing {missing}: not a GradientNoiseScale "
                             f"state_dict")
        if float(state_dict["decay"]) != self.decay:
            raise ValueError(f"the checkpoint's noise-scale decay is {state_dict['decay']}, this "
                             f"run's is {self.decay}: resume with the same decay")
        self._grad_sq = float(state_dict["grad_sq"])
        self._trace = float(state_dict["trace"])
        self._weight = float(state_dict["weight"])
        self.num_updates = int(state_dict["num_updates"])


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """What :func:`estimate_noise_scale` returns (the means over every big batch).

    Attributes:
        b_simple: ``trace_sigma / grad_sq_norm`` (NaN if ``grad_sq_norm <= 0``).
        trace_sigma: ``tr(Sigma)``, the per-example gradient variance summed over parameters.
        grad_sq_norm: ``|G|^2``, the squared norm of the expected gradient.
        num_batches: big batches used.
        small_batch_size: ``B_s``.
        big_batch_size: ``B_b`` (of the first big batch; each may differ).
    """

    b_simple: float
    trace_sigma: float
    grad_sq_norm: float
    num_batches: int
    small_batch_size: int
    big_batch_size: int


def estimate_noise_scale(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    small_batch_size: int,
) -> NoiseScaleEstimate:
    """One-shot estimate of the gradient noise scale at the model's current parameters.

    Each big batch ``(inputs, targets)`` of ``B_b`` examples is split into ``B_b / B_s``
    consecutive small batches of ``B_s = small_batch_size``. Their gradients ``g_1 ... g_k`` give
    ``|g_s|^2 = mean_i |g_i|^2`` and ``|g_b|^2 = |mean_i g_i|^2`` (the big batch's gradient when
    ``loss_fn`` returns a mean over the examples); :func:`two_batch_estimates` turns each pair into
    ``|G|^2`` and ``tr(Sigma)``, which are averaged over the big batches with equal weights, and
    ``b_simple`` is the ratio of the two means. Gradients are computed with
    ``torch.autograd.grad``, so neither the parameters nor their ``.grad`` change.

    Batch norm: the model keeps its mode. In training mode each small batch is normalised by its
    own statistics, i.e. the estimate is that of the model run with ghost batches of ``B_s``
    (choose ``B_s`` >= the model's ghost batch size); every buffer (BN running statistics,
    ``num_batches_tracked``) is restored afterwards. Dropout draws from the global RNG.

    Args:
        model: the model (plain, or wrapped: only ``model(inputs)`` and its parameters are used).
        loss_fn: ``loss_fn(outputs, targets)``, the mean loss over the examples.
        batches: big batches; each size a multiple of ``small_batch_size``, at least twice it.
        small_batch_size: ``B_s`` (>= 1).

    Returns:
        A :class:`NoiseScaleEstimate`.

    Raises:
        ValueError: no batches, no trainable parameters, or a batch size that ``B_s`` does not
            divide into at least two small batches.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(64, 3); y = x.sum(1, keepdim=True) + torch.randn(64, 1)
        >>> est = estimate_noise_scale(model, torch.nn.functional.mse_loss, [(x, y)], 8)
        >>> est.b_simple > 0, est.big_batch_size
        (True, 64)
    """
    import torch

    if isinstance(small_batch_size, bool) or not isinstance(small_batch_size, int) \
            or small_batch_size < 1:
        raise ValueError(f"small_batch_size must be an integer >= 1, got {small_batch_size!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True")
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    gns = GradientNoiseScale(decay=1.0)
    big_sizes = []
    try:
        for index, (inputs, targets) in enumerate(batches):
            big_sizes.append(len(inputs))
            small_sq, big_sq = _small_and_big_sq_norms(
                model, loss_fn, params, inputs, targets, small_batch_size, index)
            gns.update(small_sq, small_batch_size, big_sq, big_sizes[-1])
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    if not big_sizes:
        raise ValueError("batches is empty: give at least one (inputs, targets) batch")
    return NoiseScaleEstimate(gns.b_simple, gns.trace_sigma, gns.grad_sq_norm, len(big_sizes),
                              small_batch_size, big_sizes[0])


def _small_and_big_sq_norms(model, loss_fn, params, inputs, targets, small_batch_size: int,
                            index: int) -> tuple[float, float]:
    """``(mean_i |g_i|^2, |mean_i g_i|^2)`` over the consecutive small batches of one batch."""
    import torch

    size = len(inputs)
    if len(targets) != size:
        raise ValueError(f"batch {index}: {size} inputs but {len(targets)} targets")
    if size % small_batch_size or size < 2 * small_batch_size:
        raise ValueError(
            f"batch {index} has {size} examples, which small_batch_size={small_batch_size} does "
            f"not split into 2 or more equal small batches; use a divisor of the batch size")
    total = [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64
                              else torch.float32) for p in params]
    small_sq = 0.0
    chunks = zip(inputs.split(small_batch_size), targets.split(small_batch_size), strict=True)
    for x, y in chunks:
        grads = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params,
                                                                              strict=True)]
        small_sq += float(_sum_of_squares(grads))
        torch._foreach_add_(total, [g.to(t.dtype) for g, t in zip(grads, total, strict=True)])
    k = size // small_batch_size
    big_sq = float(_sum_of_squares(total)) / (k * k)
    return small_sq / k, big_sq
