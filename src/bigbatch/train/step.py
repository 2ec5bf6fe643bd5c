"""One optimizer step's arithmetic: forward and backward in micro-batches, the gradient norm.

:func:`forward_backward` is a plain function that any loop can call (the engine's is
:mod:`bigbatch.train.loop`); it leaves in ``.grad`` the gradient of the mean loss over the global
batch, also under DDP and with gradient accumulation.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> result = forward_backward(model, x, y, micro_batch_size=4)
    >>> result.num_samples, model.weight.grad.shape
    (8, torch.Size([3, 4]))
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StepResult", "finite_params", "forward_backward", "grad_norm"]


@dataclasses.dataclass
class StepResult:
    """Sums over one global batch (this process's part of it under DDP)."""

    loss_sum: torch.Tensor  # sum of per-sample losses (detached)
    correct: torch.Tensor  # number of top-1 hits
    num_samples: int


def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    no_sync: Any = None,
    world_size: int = 1,
    after_backward: Callable[[int], None] | None = None,
) -> StepResult:
    """Forward and backward over one batch, in micro-batches if asked; gradients are accumulated.

    The gradient left in ``.grad`` is that of the *mean* cross-entropy over the global batch: each
    micro-batch's summed loss is divided by ``global_batch_size``, i.e. its mean loss is weighted by
    micro size / batch size. With ghost batch norm and ``micro_batch_size`` a multiple of the ghost
    size, every ghost batch lies inside one micro-batch, so the result equals one pass up to float
    summation order (``tests/test_train_loop.py::test_micro_batches_match_one_pass``).

    Args:
        model: the model in training mode (gradients are *added* to ``.grad``: zero them first).
        x, y: the batch (this process's slice of it under DDP).
        global_batch_size: samples in the whole global batch (default ``len(x)``).
        micro_batch_size: chunk size; ``None`` or >= ``len(x)`` runs one pass.
        autocast: context for the forward pass (e.g. bf16 autocast); ``None`` = none.
        no_sync: ``callable(is_last) -> context`` that skips DDP's all-reduce on all but the last
            micro-batch; ``None`` = no DDP.
        world_size: processes whose gradients DDP *averages*; each summed loss is divided by
            ``global_batch_size / world_size`` so that the average is the gradient of the mean
            over the global batch.
        after_backward: called with each micro-batch's size after its backward (e.g. the
            noise-scale measurement's ``MicroBatchGradNorms.end_micro_batch``); ``None`` = none.

    Returns:
        :class:`StepResult` with the detached loss sum and top-1 hits of this batch.
    """
    n = x.shape[0]
    # Single process: divide by the batch size itself (world_size=1 keeps the same rounding).
    total = (global_batch_size or n) / world_size
    chunks = (
        list(zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True))
        if micro_batch_size and micro_batch_size < n
        else [(x, y)]
    )
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i, (xm, ym) in enumerate(chunks):
        sync = no_sync(i == len(chunks) - 1) if no_sync is not None else contextlib.nullcontext()
        with sync:
            with autocast or contextlib.nullcontext():
                out = model(xm)
            loss = F.cross_entropy(out.float(), ym, reduction="sum")
            (loss / total).backward()
        if after_backward is not None:
            after_backward(len(xm))
        loss_sum += loss.detach()
        correct += (out.detach().argmax(dim=1) == ym).sum()
    return StepResult(loss_sum, correct, n)


def grad_norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients (before clipping); clips them in place to ``clip`` if set."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))


def finite_params(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (no NaN/Inf)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
