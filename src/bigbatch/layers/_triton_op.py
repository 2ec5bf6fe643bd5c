"""The Triton path as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` calls it.

``bigbatch::ghost_bn_forward`` and ``bigbatch::ghost_bn_backward`` run the Triton kernels (or, if a
launch fails, the PyTorch ops, after one warning: ``_function.triton_forward``). Each has a fake
(meta) implementation giving the output shapes, dtypes and strides, so the compiler traces through
them without a graph break, and the forward has an autograd formula that calls the backward op;
double backward differentiates a recomputation (``_function.double_backward``).
``tests/test_ghost_bn_triton.py::test_compile_fullgraph`` checks compiled against eager with a
random output gradient. ``torch.library.custom_op`` is torch >= 2.4: on older torch
(``AVAILABLE`` False) compiled code traces the PyTorch ops instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bigbatch.layers import _function
from bigbatch.layers._layout import channels_last, memory_format

__all__ = ["AVAILABLE", "ghost_bn_backward", "ghost_bn_forward"]

AVAILABLE = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")


def _forward(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, ghost_batch_size: int, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, rstd) for ``x`` contiguous in its memory format; statistics ``(G, C)``."""
    last = channels_last(x, memory_format(x))
    return _function.triton_forward(x, weight, bias, ghost_batch_size, eps, last)


def _forward_fake(x, weight, bias, ghost_batch_size, eps):
    n, c = x.shape[:2]
    g = (n + ghost_batch_size - 1) // ghost_batch_size
    stats = [x.new_empty((g, c), dtype=_function._compute_dtype(x)) for _ in range(3)]
    return torch.empty_like(x, memory_format=memory_format(x)), *stats


def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    ghost_batch_size: int,
    needs_dx: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias); dx is empty when not ``needs_dx``. ``dy`` laid out as ``x``."""
    needs = (needs_dx, True, True)
    dx, grad_w, grad_b = _function.backward_any(
        "triton", x, dy, weight, (mean, rstd), ghost_batch_size, needs
    )
    return (x.new_empty(0) if dx is None else dx), grad_w, grad_b


def _backward_fake(dy, x, weight, mean, rstd, ghost_batch_size, needs_dx):
    dx = torch.empty_like(x, memory_format=memory_format(x)) if needs_dx else x.new_empty(0)
    c = x.shape[1]
    return dx, mean.new_empty(c), mean.new_empty(c)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, ghost_batch_size, eps = inputs
    _, mean, var, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.ghost_batch_size, ctx.eps = ghost_batch_size, eps
    ctx.mark_non_differentiable(mean, var, rstd)


def _autograd(ctx, grad_out, _grad_mean, _grad_var, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    needs, g = tuple(ctx.needs_input_grad[:3]), ctx.ghost_batch_size
    grads = _function.input_grads(x, weight, bias, grad_out, g, ctx.eps, needs,
                                  lambda dy: ghost_bn_backward(dy, x, weight, mean, rstd, g,
                                                               needs[0]))
    return grads + (None, None)


ghost_bn_forward = ghost_bn_backward = None
if AVAILABLE:
    ghost_bn_forward = torch.library.custom_op("bigbatch::ghost_bn_forward", mutates_args=())(
        _forward
    )
    ghost_bn_forward.register_fake(_forward_fake)
    ghost_bn_backward = torch.library.custom_op("bigbatch::ghost_bn_backward", mutates_args=())(
        _backward_op
    )
    ghost_bn_backward.register_fake(_backward_fake)
    ghost_bn_forward.register_autograd(_autograd, setup_context=_setup_context)
