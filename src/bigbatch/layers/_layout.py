"""Memory layout of ghost batch norm's input, shared by every backend.

Every input is handled as a 3-d tensor, either (N, C, S) ("channels first") or (N, S, C) ("channels
last", also used for (N, C) input), where S is the product of the spatial sizes. Both are views of a
tensor that is contiguous in its memory format, so no data is copied.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "REDUCED_PRECISION",
    "channels_last",
    "from_3d",
    "groups",
    "memory_format",
    "param_shape",
    "reduce_dims",
    "to_3d",
    "view_3d",
]

REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def memory_format(x: Tensor) -> torch.memory_format:
    """The memory format ``x`` is contiguous in (channels_last only when it is not also plain)."""
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


def channels_last(x: Tensor, fmt: torch.memory_format) -> bool:
    """Whether channels are the fastest dimension of ``x`` laid out in ``fmt`` ((N, C) included)."""
    return x.dim() == 2 or fmt != torch.contiguous_format


def to_3d(t: Tensor, last: bool) -> Tensor:
    """(N, C, S), or (N, S, C) if ``last``: a view when ``t`` is contiguous in its format."""
    n, c = t.shape[:2]
    if t.dim() == 2:
        return t.unsqueeze(1)
    if last:
        return t.movedim(1, -1).reshape(n, -1, c)
    return t.reshape(n, c, -1)


def view_3d(t: Tensor, last: bool) -> Tensor:
    """``to_3d`` for a tensor to be written through: must be a view, never a copy."""
    t3 = to_3d(t, last)
    if t3.data_ptr() != t.data_ptr() or not t3.is_contiguous():
        raise RuntimeError(f"internal: no contiguous 3-d view of a {tuple(t.shape)} tensor")
    return t3


def from_3d(t3: Tensor, shape: torch.Size, last: bool) -> Tensor:
    """The inverse of ``to_3d`` for a tensor of the original ``shape``."""
    if len(shape) == 2:
        return t3.squeeze(1)
    if last:
        return t3.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)
    return t3.reshape(shape)


def groups(t3: Tensor, ghost_batch_size: int) -> list[Tensor]:
    """(k, g, A, B) view of the full ghost batches, then (1, r, A, B) for a shorter last one."""
    n = t3.shape[0]
    k = n // ghost_batch_size
    full = k * ghost_batch_size
    out = [t3[:full].view(k, ghost_batch_size, *t3.shape[1:])]
    if full < n:
        out.append(t3[full:].unsqueeze(0))
    return out


def param_shape(last: bool) -> tuple[int, ...]:
    """Shape that broadcasts a (C,) parameter over a (groups, samples, A, B) view."""
    return (1, 1, 1, -1) if last else (1, 1, -1, 1)


def reduce_dims(last: bool) -> tuple[int, int]:
    """Dims of a (groups, samples, A, B) view to reduce: samples and the spatial one of A, B."""
    return (1, 2) if last else (1, 3)
