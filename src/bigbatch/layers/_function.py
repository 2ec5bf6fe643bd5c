"""The autograd Function of ghost batch norm and its three backends: C kernel, Triton, PyTorch ops.

Forward, per ghost batch and channel over M = (samples x spatial) values: mean mu, biased variance
var, rstd = 1/sqrt(var + eps), y = x * (w * rstd) + (b - mu * w * rstd). Backward, with the standard
batch-norm gradient (x_hat = (x - mu) * rstd):

    dL/dx = w * rstd * (dy - sum(dy)/M - x_hat * sum(dy * x_hat)/M)
          = A * dy + B * x + D,  A = w*rstd, B = -A*rstd^2*sum(dy*(x-mu))/M, D = -A*sum(dy)/M - B*mu
    dL/dw = sum over ghost batches of rstd * sum(dy * (x - mu)),   dL/db = sum(dy).

The C kernel (``_cpu_kernel.py``) and the Triton kernels (``_triton_kernel.py``) do this in one pass
per direction; the PyTorch ops do it with whole-tensor reductions and fused multiply-adds over a
``(k, g, ...)`` view, written into one output buffer (autograd through the forward ops makes several
buffers; measured about 1.5x slower). Double backward (create_graph=True) differentiates a
recomputation with out-of-place ops (:func:`forward_ops`).
``tests/test_ghost_bn.py::test_gradcheck`` proves every backend with gradcheck and gradgradcheck
in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bigbatch.layers import _cpu_kernel, backend
from bigbatch.layers._layout import (
    REDUCED_PRECISION,
    channels_last,
    from_3d,
    groups,
    memory_format,
    param_shape,
    reduce_dims,
    to_3d,
    view_3d,
)

__all__ = [
    "GhostBatchNormFunction",
    "backward_any",
    "double_backward",
    "forward_ops",
    "input_grads",
    "triton_forward",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in REDUCED_PRECISION else x.dtype


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype).reshape(-1).contiguous()


def _stats_per_group(stat: Tensor, ghost_batch_size: int, n: int, last: bool) -> list[Tensor]:
    """(G, C) statistics as broadcastable (k, 1, ...) tensors matching ``layout.groups``."""
    k = n // ghost_batch_size
    shape = (-1, 1, 1, stat.shape[1]) if last else (-1, 1, stat.shape[1], 1)
    parts = [stat[:k].reshape(shape)]
    if k < stat.shape[0]:
        parts.append(stat[k:].reshape(shape))
    return parts


def _forward_torch(x: Tensor, weight, bias, ghost_batch_size: int, eps: float, last: bool):
    """PyTorch ops into one output buffer; returns (y, mean, var, rstd), the stats ``(G, C)``."""
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    out = torch.empty_like(xc)  # written through views: the output itself is no view
    shape = param_shape(last)
    w = None if weight is None else weight.to(dtype).view(shape)
    b = None if bias is None else bias.to(dtype).view(shape)
    dims = reduce_dims(last)
    means, rstds, variances = [], [], []
    # At most two groups: the ghost batches that fill the batch, then the shorter last one.
    for xg, og in zip(
        groups(to_3d(xc, last), ghost_batch_size),
        groups(to_3d(out, last), ghost_batch_size),
        strict=True,
    ):
        count = xg.shape[1] * xg.shape[dims[1]]
        mean = xg.sum(dims, keepdim=True).div_(count)
        # Two-pass variance (as nn.BatchNorm's CPU kernel): no cancellation when |mean| >> std.
        torch.sub(xg, mean, out=og)
        og.square_()
        var = og.sum(dims, keepdim=True).div_(count)
        rstd = (var + eps).rsqrt_()
        scale = rstd if w is None else rstd * w
        shift = -mean * scale if b is None else b - mean * scale
        torch.addcmul(shift, xg, scale, out=og)
        means.append(mean.flatten(1))
        rstds.append(rstd.flatten(1))
        variances.append(var.flatten(1))
    return out.to(x.dtype), torch.cat(means), torch.cat(variances), torch.cat(rstds)


def _backward_torch(x, dy, weight, mean, rstd, ghost_batch_size: int, last: bool, needs_dx: bool):
    """PyTorch ops: (dx or None, grad_weight, grad_bias) in the statistics' dtype."""
    dtype = mean.dtype
    xc, dyc = x.to(dtype), dy.to(dtype)
    dx = torch.empty_like(xc)  # also scratch for dy * (x - mu) when no input gradient is needed
    w = None if weight is None else weight.to(dtype).view(param_shape(last))
    dims = reduce_dims(last)
    n = x.shape[0]
    grad_weight = grad_bias = 0
    for xg, dyg, dxg, mu, rs in zip(
        groups(to_3d(xc, last), ghost_batch_size),
        groups(to_3d(dyc, last), ghost_batch_size),
        groups(to_3d(dx, last), ghost_batch_size),
        _stats_per_group(mean, ghost_batch_size, n, last),
        _stats_per_group(rstd, ghost_batch_size, n, last),
        strict=True,
    ):
        count = xg.shape[1] * xg.shape[dims[1]]
        sum_dy = dyg.sum(dims, keepdim=True)
        torch.sub(xg, mu, out=dxg)
        dxg.mul_(dyg)
        sum_dy_xmu = dxg.sum(dims, keepdim=True)
        grad_weight = grad_weight + (sum_dy_xmu * rs).sum((0,) + dims)
        grad_bias = grad_bias + sum_dy.sum((0,) + dims)
        if needs_dx:
            a = rs if w is None else w * rs
            b = -a * rs * rs * sum_dy_xmu / count
            d = -a * sum_dy / count - b * mu
            torch.addcmul(d, xg, b, out=dxg)
            dxg.addcmul_(dyg, a)
    return (dx.to(x.dtype) if needs_dx else None), grad_weight, grad_bias


def triton_forward(x: Tensor, weight, bias, ghost_batch_size: int, eps: float, last: bool):
    """The Triton kernel, or the ops after one warning if its launch fails: (y, mean, var, rstd)."""
    try:
        from bigbatch.layers import _triton_kernel

        dtype = _compute_dtype(x)
        out = torch.empty_like(x)
        mean, var, rstd = _triton_kernel.forward(
            x, _as(weight, dtype), _as(bias, dtype), ghost_batch_size, eps, last, out
        )
        return out, mean, var, rstd
    except Exception as exc:  # a compiler/driver error of any type: the ops give the same result
        backend.launch_failed(x.device.type, exc)
        return _forward_torch(x, weight, bias, ghost_batch_size, eps, last)


def _triton_backward(x, dy, weight, mean, rstd, ghost_batch_size: int, last: bool, needs_dx):
    try:
        from bigbatch.layers import _triton_kernel

        dx = torch.empty_like(x) if needs_dx else None
        w = _as(weight, mean.dtype)
        grad_w, grad_b = _triton_kernel.backward(x, dy, w, mean, rstd, ghost_batch_size, last, dx)
        return dx, grad_w, grad_b
    except Exception as exc:  # as in triton_forward
        backend.launch_failed(x.device.type, exc)
        return _backward_torch(x, dy, weight, mean, rstd, ghost_batch_size, last, needs_dx)


def _forward_c(x: Tensor, weight, bias, ghost_batch_size: int, eps: float, last: bool):
    """The C kernel: (y, mean, var, stats), ``stats`` being its own (4, G, C) record."""
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    out = torch.empty_like(xc)
    stats = _cpu_kernel.forward(
        to_3d(xc, last).contiguous(), _as(weight, dtype), _as(bias, dtype), ghost_batch_size, eps,
        last, view_3d(out, last),
    )  # fmt: skip
    return out.to(x.dtype), stats[0], stats[1], stats


def _backward_c(x, dy, weight, stats, ghost_batch_size: int, last: bool, needs):
    dtype = stats.dtype
    xc, dyc = x.to(dtype), dy.to(dtype)
    dx = torch.empty_like(xc) if needs[0] else None
    grad_w, grad_b = _cpu_kernel.backward(
        to_3d(xc, last).contiguous(), to_3d(dyc, last).contiguous(), _as(weight, dtype), stats,
        ghost_batch_size, last, needs, None if dx is None else view_3d(dx, last),
    )  # fmt: skip
    return (None if dx is None else dx.to(x.dtype)), grad_w, grad_b


def backward_any(name: str, x, dy, weight, saved, ghost_batch_size: int, needs):
    """(dx, grad_weight, grad_bias) by backend ``name``; ``saved`` is (mean, rstd) or C stats."""
    last = channels_last(x, memory_format(x))
    if name == "c":
        return _backward_c(x, dy, weight, saved[0], ghost_batch_size, last, needs)
    run = _triton_backward if name == "triton" else _backward_torch
    return run(x, dy, weight, *saved, ghost_batch_size, last, needs[0])


class GhostBatchNormFunction(torch.autograd.Function):
    """Ghost batch norm by backend ``name`` with a hand-written backward (see the module doc).

    Takes x contiguous in its memory format. Returns the output and, non-differentiable, the
    per-ghost-batch means and biased variances ``(G, C)`` for the running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, ghost_batch_size, eps, name):
        last = channels_last(x, memory_format(x))
        if name == "c":
            y, mean, var, stats = _forward_c(x, weight, bias, ghost_batch_size, eps, last)
            saved = (stats,)
        else:
            run = triton_forward if name == "triton" else _forward_torch
            y, mean, var, rstd = run(x, weight, bias, ghost_batch_size, eps, last)
            saved = (mean, rstd)
        ctx.ghost_batch_size, ctx.eps, ctx.name = ghost_batch_size, eps, name
        ctx.save_for_backward(x, weight, bias, *saved)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, *saved = ctx.saved_tensors
        needs, g = ctx.needs_input_grad[:3], ctx.ghost_batch_size
        grads = input_grads(x, weight, bias, grad_out, g, ctx.eps, needs,
                            lambda dy: backward_any(ctx.name, x, dy, weight, saved, g, needs))
        return grads + (None, None, None)


def input_grads(x: Tensor, weight, bias, grad_out: Tensor, ghost_batch_size: int, eps: float,
                needs, run) -> tuple:
    """``(dx, dw, db)`` of the autograd Function and of the custom op (``_triton_op``).

    With ``create_graph=True`` it differentiates a recomputation (:func:`double_backward`);
    otherwise ``run(dy)`` gives the backend's ``(dx, dw, db)`` for ``dy`` laid out as ``x``, and
    the weight and bias gradients are cast to their parameters' dtypes (``None`` where
    ``needs`` says no gradient is wanted).
    """
    if torch.is_grad_enabled():
        return double_backward(x, weight, bias, grad_out, ghost_batch_size, eps, needs)
    dx, grad_w, grad_b = run(grad_out.contiguous(memory_format=memory_format(x)))
    return (dx if needs[0] else None, grad_w.to(weight.dtype) if needs[1] else None,
            grad_b.to(bias.dtype) if needs[2] else None)


def forward_ops(x: Tensor, weight, bias, ghost_batch_size: int, eps: float):
    """The same maths with out-of-place, differentiable ops: (y, mean, var), the stats detached.

    Used for double backward, and under torch.compile for the non-Triton backends: it traces these
    ops (and fuses them) instead of a custom Function, since some torch versions compile the
    Function's backward wrongly (torch 2.11 on CUDA gave a wrong input gradient).
    """
    fmt = memory_format(x)
    last = channels_last(x, fmt)
    shape = param_shape(last)
    dims = reduce_dims(last)
    xc = x.contiguous(memory_format=fmt)
    xc = xc.to(_compute_dtype(xc))
    outs, means, variances = [], [], []
    for xg in groups(to_3d(xc, last), ghost_batch_size):
        var, mean = torch.var_mean(xg, dims, keepdim=True, correction=0)
        y = (xg - mean) * torch.rsqrt(var + eps)
        if weight is not None:
            y = y * weight.to(y.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(y.dtype).view(shape)
        outs.append(y.flatten(0, 1))
        means.append(mean.detach().flatten(1))
        variances.append(var.detach().flatten(1))
    y = from_3d(torch.cat(outs), x.shape, last).to(x.dtype)
    return y, torch.cat(means), torch.cat(variances)


def double_backward(x, weight, bias, grad_out, ghost_batch_size: int, eps: float, needs):
    """(dx, dw, db) differentiable (create_graph=True), by autograd through :func:`forward_ops`."""
    inputs = [t for t, needed in zip((x, weight, bias), needs, strict=True) if needed]
    with torch.enable_grad():
        y = forward_ops(x, weight, bias, ghost_batch_size, eps)[0]
    grads = iter(torch.autograd.grad(y, inputs, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if needed else None for needed in needs)
