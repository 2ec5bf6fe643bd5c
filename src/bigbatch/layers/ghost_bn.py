"""Ghost Batch Normalization (Hoffer, Hubara, Soudry 2017, Algorithm 1), vectorised.

In training, ``GhostBatchNorm*d(x)`` equals applying the matching ``nn.BatchNorm*d`` (same weight,
bias and buffers) to each slice of ``x.split(ghost_batch_size)`` in order and concatenating the
results: outputs, gradients, ``running_mean``, ``running_var`` and ``num_batches_tracked`` all
match, including a shorter last ghost batch, ``momentum=None`` and ``track_running_stats=False``. In
evaluation it *is* ``nn.BatchNorm*d``. ``tests/test_ghost_bn.py`` proves this against
``tests/reference.py``.

How it is fast. The official code runs forward and backward once per ghost batch. Here one custom
autograd Function handles every ghost batch at once. On CPU it calls fused C kernels
(``ghost_bn_cpu.c``, built on first use, see ``_cpu_kernel.py``): each (ghost batch, channel
block) is read once for its statistics and once, from cache, for the output, in parallel on torch's
threads; 0.7-1.0x the time of ``nn.BatchNorm`` (benchmarks/RESULTS.md). Elsewhere (GPU, no C
compiler, ``BIGBATCH_CPU_KERNEL=0``) the batch is viewed, without a copy, as ``(k, g, ...)`` ghost
groups (plus at most one shorter remainder group) and a few whole-tensor ops compute the same
statistics, output and gradients into single buffers. Under ``torch.compile`` plain differentiable
ops are traced instead of the Function. The running statistics after k ghost batches are applied
in closed form (see ``_update_running_stats``) instead of k sequential updates.
"""

from __future__ import annotations

import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bigbatch.layers import _cpu_kernel

__all__ = [
    "ghost_batch_norm",
    "GhostBatchNorm",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
]

_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


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
    values_per_sample = math.prod(x.shape[2:]) if n else 1
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


# --------------------------------------------------------------------------------------------------
# Layout: every input is handled as a contiguous 3-d tensor, either (N, C, S) ("channels first") or
# (N, S, C) ("channels last", also used for (N, C) input), where S is the product of spatial sizes.
# Both are views of a tensor that is contiguous in its memory format, so no data is copied.


def _memory_format(x: Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    if (
        x.dim() == 5
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channels_last(x: Tensor, memory_format: torch.memory_format) -> bool:
    return x.dim() == 2 or memory_format != torch.contiguous_format


def _to_3d(t: Tensor, channels_last: bool) -> Tensor:
    n, c = t.shape[:2]
    if t.dim() == 2:
        return t.unsqueeze(1)
    if channels_last:
        return t.movedim(1, -1).reshape(n, -1, c)
    return t.reshape(n, c, -1)


def _view_3d(t: Tensor, channels_last: bool) -> Tensor:
    """``_to_3d`` for a tensor to be written through: must be a view, never a copy."""
    t3 = _to_3d(t, channels_last)
    if t3.data_ptr() != t.data_ptr() or not t3.is_contiguous():
        raise RuntimeError(f"internal: no contiguous 3-d view of a {tuple(t.shape)} tensor")
    return t3


def _from_3d(t3: Tensor, shape: torch.Size, channels_last: bool) -> Tensor:
    if len(shape) == 2:
        return t3.squeeze(1)
    if channels_last:
        return t3.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return t3.reshape(shape)


def _groups(t3: Tensor, ghost_batch_size: int) -> list[Tensor]:
    """(k, g, A, B) view of the full ghost batches, then (1, r, A, B) for a shorter last one."""
    n = t3.shape[0]
    k = n // ghost_batch_size
    full = k * ghost_batch_size
    groups = [t3[:full].view(k, ghost_batch_size, *t3.shape[1:])]
    if full < n:
        groups.append(t3[full:].unsqueeze(0))
    return groups


class _GhostBatchNormFunction(torch.autograd.Function):
    """Per-ghost-batch normalisation with a hand-written backward.

    Forward, per ghost batch and channel over M = (samples x spatial) values: mean mu, biased
    variance var, invstd = 1/sqrt(var + eps), y = x * (w * invstd) + (b - mu * w * invstd).
    Backward, with the standard batch-norm gradient (x_hat = (x - mu) * invstd):
        dL/dx = w * invstd * (dy - sum(dy)/M - x_hat * sum(dy * x_hat)/M)
              = A * dy + B * x + D,  A = w*invstd, B = -A*invstd^2*sum(dy*(x-mu))/M,
                                     D = -A*sum(dy)/M - B*mu
        dL/dw = sum over ghost batches of invstd * sum(dy * (x - mu)),   dL/db = sum(dy).
    Each quantity is a whole-tensor reduction or a fused multiply-add over the (k, g, ...) view,
    written into the dx buffer, so the only large allocation is dx itself (autograd through the
    forward ops makes several; measured about 1.5x slower). Double backward (create_graph=True)
    differentiates a recomputation with out-of-place ops instead. ``test_gradcheck`` proves both
    with gradcheck and gradgradcheck in float64.

    Returns the output and, as non-differentiable outputs, the per-ghost means and biased variances
    ``(G, C)`` for the running statistics.
    """

    @staticmethod
    def forward(ctx, x_in, weight, bias, ghost_batch_size, eps):
        memory_format = _memory_format(x_in)
        channels_last = _channels_last(x_in, memory_format)
        x = x_in.contiguous(memory_format=memory_format)
        compute_dtype = torch.float32 if x.dtype in _REDUCED_PRECISION else x.dtype
        xc = x.to(compute_dtype)
        w = None if weight is None else weight.to(compute_dtype).contiguous()
        b = None if bias is None else bias.to(compute_dtype).contiguous()
        out = torch.empty_like(xc)  # written through views: the output itself is no view
        ctx.ghost_batch_size = ghost_batch_size
        ctx.eps = eps
        ctx.kernel = _cpu_kernel.usable(xc)
        if ctx.kernel:  # fused C kernels (see _cpu_kernel.py): one pass per direction over memory
            stats = _cpu_kernel.forward(
                _to_3d(xc, channels_last).contiguous(),
                w,
                b,
                ghost_batch_size,
                eps,
                channels_last,
                _view_3d(out, channels_last),
            )
            ctx.save_for_backward(x_in, weight, bias, stats)
            mean, var = stats[0], stats[1]
            ctx.mark_non_differentiable(mean, var)
            return out.to(x.dtype), mean, var
        shape = _param_shape(channels_last)
        w = None if w is None else w.view(shape)
        b = None if b is None else b.view(shape)
        dims = _reduce_dims(channels_last)
        means, invstds, variances = [], [], []
        # At most two groups: the ghost batches that fill the batch, then the shorter last one.
        for xg, og in zip(
            _groups(_to_3d(xc, channels_last), ghost_batch_size),
            _groups(_to_3d(out, channels_last), ghost_batch_size),
            strict=True,
        ):
            count = xg.shape[1] * xg.shape[dims[1]]
            mean = xg.sum(dims, keepdim=True).div_(count)
            # Two-pass variance (as nn.BatchNorm's CPU kernel): no cancellation when |mean| >> std.
            torch.sub(xg, mean, out=og)
            og.square_()
            var = og.sum(dims, keepdim=True).div_(count)
            invstd = (var + eps).rsqrt_()
            scale = invstd if w is None else invstd * w
            shift = -mean * scale if b is None else b - mean * scale
            torch.addcmul(shift, xg, scale, out=og)
            means.append(mean)
            invstds.append(invstd)
            variances.append(var)
        ctx.save_for_backward(x_in, weight, bias, *means, *invstds)
        batch_mean = torch.cat([m.flatten(1) for m in means])
        batch_var = torch.cat([v.flatten(1) for v in variances])
        ctx.mark_non_differentiable(batch_mean, batch_var)
        return out.to(x.dtype), batch_mean, batch_var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, *stats = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation instead
            return _double_backward(ctx, x, weight, bias, grad_out)
        g = ctx.ghost_batch_size
        memory_format = _memory_format(x)
        channels_last = _channels_last(x, memory_format)
        compute_dtype = stats[0].dtype
        xc = x.contiguous(memory_format=memory_format).to(compute_dtype)
        dy = grad_out.contiguous(memory_format=memory_format).to(compute_dtype)
        if ctx.kernel:
            (stats,) = stats
            w = None if weight is None else weight.to(compute_dtype).reshape(-1).contiguous()
            dx = torch.empty_like(xc) if ctx.needs_input_grad[0] else None
            grad_w, grad_b = _cpu_kernel.backward(
                _to_3d(xc, channels_last).contiguous(),
                _to_3d(dy, channels_last).contiguous(),
                w,
                stats,
                g,
                channels_last,
                ctx.needs_input_grad[:3],
                None if dx is None else _view_3d(dx, channels_last),
            )
            grad_x = None if dx is None else dx.to(x.dtype)
            grad_w = None if grad_w is None else grad_w.to(weight.dtype)
            grad_b = None if grad_b is None else grad_b.to(bias.dtype)
            return grad_x, grad_w, grad_b, None, None
        means, invstds = stats[: len(stats) // 2], stats[len(stats) // 2 :]
        dx = torch.empty_like(xc)
        w = None if weight is None else weight.to(compute_dtype).view(_param_shape(channels_last))
        dims = _reduce_dims(channels_last)
        grad_weight = grad_bias = 0
        for xg, dyg, dxg, mean, invstd in zip(
            _groups(_to_3d(xc, channels_last), g),
            _groups(_to_3d(dy, channels_last), g),
            _groups(_to_3d(dx, channels_last), g),
            means,
            invstds,
            strict=True,
        ):
            count = xg.shape[1] * xg.shape[dims[1]]
            sum_dy = dyg.sum(dims, keepdim=True)
            torch.sub(xg, mean, out=dxg)  # dx's buffer doubles as scratch for dy * (x - mu)
            dxg.mul_(dyg)
            sum_dy_xmu = dxg.sum(dims, keepdim=True)
            grad_weight = grad_weight + (sum_dy_xmu * invstd).sum((0,) + dims)
            grad_bias = grad_bias + sum_dy.sum((0,) + dims)
            if ctx.needs_input_grad[0]:
                a = invstd if w is None else w * invstd
                b = -a * invstd * invstd * sum_dy_xmu / count
                d = -a * sum_dy / count - b * mean
                torch.addcmul(d, xg, b, out=dxg)
                dxg.addcmul_(dyg, a)
        grad_x = dx.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad_bias.to(bias.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None


def _param_shape(channels_last: bool) -> tuple[int, ...]:
    return (1, 1, 1, -1) if channels_last else (1, 1, -1, 1)


def _reduce_dims(channels_last: bool) -> tuple[int, int]:
    """Dims of a (groups, samples, A, B) view to reduce: samples and the spatial one of A, B."""
    return (1, 2) if channels_last else (1, 3)


def _ghost_forward_ops(
    x: Tensor, weight, bias, ghost_batch_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The same maths as _GhostBatchNormFunction.forward with out-of-place, differentiable ops.

    Used for double backward, and under torch.compile, which traces these ops (and fuses them)
    instead of a custom Function: some torch versions compile the Function's backward wrongly
    (torch 2.11 on CUDA gave a wrong input gradient; see tests/test_ghost_bn_cuda.py). Returns the
    output and the per-ghost-batch means and biased variances ``(G, C)``, detached.
    """
    memory_format = _memory_format(x)
    channels_last = _channels_last(x, memory_format)
    shape = _param_shape(channels_last)
    dims = _reduce_dims(channels_last)
    xc = x.contiguous(memory_format=memory_format)
    xc = xc.float() if xc.dtype in _REDUCED_PRECISION else xc
    outs, means, variances = [], [], []
    for xg in _groups(_to_3d(xc, channels_last), ghost_batch_size):
        var, mean = torch.var_mean(xg, dims, keepdim=True, correction=0)
        y = (xg - mean) * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.to(y.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(y.dtype).view(shape)
        outs.append(y.flatten(0, 1))
        means.append(mean.detach().flatten(1))
        variances.append(var.detach().flatten(1))
    y = _from_3d(torch.cat(outs), x.shape, channels_last).to(x.dtype)
    return y, torch.cat(means), torch.cat(variances)


def _double_backward(ctx, x, weight, bias, grad_out):
    inputs = [
        t for t, needed in zip((x, weight, bias), ctx.needs_input_grad[:3], strict=True) if needed
    ]
    with torch.enable_grad():
        y = _ghost_forward_ops(x, weight, bias, ctx.ghost_batch_size, ctx.eps)[0]
    grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True, allow_unused=True))
    grad_inputs = tuple(next(grads) if needed else None for needed in ctx.needs_input_grad[:3])
    return grad_inputs + (None, None)


# --------------------------------------------------------------------------------------------------


def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var_unbiased: Tensor,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> None:
    r"""Apply k = len(batch_mean) sequential batch-norm updates at once, in closed form.

    With momentum m, nn.BatchNorm updates r_{i+1} = (1 - m) r_i + m s_i for each ghost batch i =
    0..k-1
    in order (s_i its mean, or its unbiased variance for running_var). Unrolling the recursion:

        r_k = (1 - m)^k r_0 + sum_{i<k} m (1 - m)^(k-1-i) s_i,

    a weighted sum whose weights are computed once as a (k, 1) tensor. With momentum=None
    nn.BatchNorm first increments n = num_batches_tracked, then uses m = 1/n, i.e. n r_n = (n - 1)
    r_{n-1} + s_n.
    Telescoping from n0 = num_batches_tracked before the call to n0 + k:

        (n0 + k) r = n0 r_0 + sum_i s_i,   so   r = (n0 r_0 + sum_i s_i) / (n0 + k),

    the cumulative average with one count per ghost batch. ``test_matches_reference`` checks both
    against nn.BatchNorm applied slice by slice; they agree to float rounding.
    """
    k = batch_mean.shape[0]
    dtype = torch.promote_types(running_mean.dtype, torch.float32)
    batch_mean = batch_mean.to(dtype)
    batch_var_unbiased = batch_var_unbiased.to(dtype)
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError(
                "momentum=None (cumulative moving average) needs num_batches_tracked; pass the "
                "module's num_batches_tracked buffer or use a float momentum"
            )
        n0 = num_batches_tracked.to(dtype)
        new_mean = (n0 * running_mean.to(dtype) + batch_mean.sum(0)) / (n0 + k)
        new_var = (n0 * running_var.to(dtype) + batch_var_unbiased.sum(0)) / (n0 + k)
    else:
        m = float(momentum)
        decay = (1.0 - m) ** k
        if _eager_cpu_update(running_mean, running_var, batch_mean, momentum):
            # The same weights from Python numbers and two fused in-place ops: cheaper per call.
            # (Under torch.compile k may be symbolic, hence the tensor form below.)
            weights = batch_mean.new_tensor([m * (1.0 - m) ** (k - 1 - i) for i in range(k)])
            running_mean.addmv_(batch_mean.t(), weights, beta=decay)
            running_var.addmv_(batch_var_unbiased.t(), weights, beta=decay)
            if num_batches_tracked is not None:
                num_batches_tracked.add_(k)
            return
        exponents = torch.arange(k - 1, -1, -1, dtype=dtype, device=batch_mean.device)
        weights = (m * (1.0 - m) ** exponents).unsqueeze(1)
        new_mean = decay * running_mean.to(dtype) + (weights * batch_mean).sum(0)
        new_var = decay * running_var.to(dtype) + (weights * batch_var_unbiased).sum(0)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(k)


def _eager_cpu_update(
    running_mean: Tensor, running_var: Tensor, batch_mean: Tensor, momentum: float | None
) -> bool:
    """Whether ``_update_running_stats`` can take its eager CPU path (same dtype, a momentum)."""
    return (
        momentum is not None
        and batch_mean.device.type == "cpu"
        and running_mean.dtype == running_var.dtype == batch_mean.dtype
        and running_mean.device == batch_mean.device
        and not torch.compiler.is_compiling()
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
    if x.dim() < 2:
        raise ValueError(
            f"ghost_batch_norm expects an input of shape (N, C, *), got {x.dim()}-d shape "
            f"{tuple(x.shape)}; add a batch dimension"
        )
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "ghost_batch_norm with training=False normalises with the running statistics; pass "
                "running_mean and running_var, or training=True to use batch statistics"
            )
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    _check_single_value(x, ghost_batch_size)
    track = running_mean is not None and running_var is not None
    if x.shape[0] <= ghost_batch_size:
        # One ghost batch: exactly nn.BatchNorm. momentum=None is done in closed form (no .item(),
        # so torch.compile keeps one graph): momentum=1 copies the batch stats into scratch buffers.
        if not track:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        if momentum is not None:
            if num_batches_tracked is not None:
                num_batches_tracked.add_(1)
            return F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        batch_mean, batch_var = torch.zeros_like(running_mean), torch.ones_like(running_var)
        y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
        with torch.no_grad():
            _update_running_stats(
                running_mean,
                running_var,
                batch_mean[None],
                batch_var[None],
                None,
                num_batches_tracked,
            )
        return y
    if x.numel() == 0:
        # Empty samples (a zero-sized spatial dim): nn.BatchNorm on each empty slice returns it
        # empty and leaves the running statistics alone; each slice still counts as a batch.
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.0, eps)
        if track and num_batches_tracked is not None:
            num_batches_tracked.add_(-(-x.shape[0] // ghost_batch_size))
        return y
    if torch.compiler.is_compiling():
        y, batch_mean, batch_var = _ghost_forward_ops(x, weight, bias, ghost_batch_size, eps)
    else:
        y, batch_mean, batch_var = _GhostBatchNormFunction.apply(
            x, weight, bias, ghost_batch_size, eps
        )
    if track:
        n, k = x.shape[0], batch_mean.shape[0]
        values_per_sample = math.prod(x.shape[2:])
        full = ghost_batch_size * values_per_sample
        last = (n - (k - 1) * ghost_batch_size) * values_per_sample
        # Values per (ghost batch, channel), built on the stats' device: no host-to-device copy.
        counts = torch.full((k, 1), full, dtype=batch_var.dtype, device=batch_var.device)
        counts[-1] = last
        with torch.no_grad():
            _update_running_stats(
                running_mean,
                running_var,
                batch_mean,
                batch_var * counts / (counts - 1),  # unbiased, as nn.BatchNorm stores
                momentum,
                num_batches_tracked,
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
