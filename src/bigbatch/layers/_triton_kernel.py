"""Triton kernels of ghost batch norm, for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1).

Work unit, as in the C kernel (``ghost_bn_cpu.c``): one program per (ghost batch, channel block).
The input is addressed as (N, C, S) through the strides sn, sc, ss, so contiguous (C then S) and
channels_last (S then C) memory are read in place, (N, C) being S = 1.

Forward: one pass over the ghost batch's M = samples x S values per channel, in tiles of BLOCK_M;
each tile's mean and sum of squared deviations (two-pass, inside registers) are merged into the
running ones with Chan's formula, so the statistics never form E[x^2] - E[x]^2, which cancels when
|mean| >> std. A second pass writes y = x * scale + shift in the input's dtype. Statistics are
float32 (float64 for float64 input).

Backward: pass 1 reduces sum(dy) and sum(dy * x_hat) per (ghost batch, channel) and stores them as
(G, C) partials; pass 2 writes dx = w * rstd * (dy - sum(dy)/M - x_hat * sum(dy * x_hat)/M). The
weight and bias gradients are the partials summed over G by the caller: deterministic, no float
atomics.

Blocks are chosen from the shape (``blocks``), never autotuned: the interpreter cannot autotune.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["backward", "blocks", "forward"]

_TILE = 4096  # values per tile: 16 KiB of float32 registers per program


def blocks(channels: int, values_per_ghost: int, channels_fastest: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for a ghost batch of ``values_per_ghost`` values per channel.

    Channels-fastest memory (channels_last, (N, C)) takes wide channel blocks so that each row of
    the tile is one coalesced read; channels-first memory takes long runs along M for the same
    reason, and few channels.
    """
    m = triton.next_power_of_2(max(values_per_ghost, 1))
    c = triton.next_power_of_2(max(channels, 1))
    if channels_fastest:
        block_c = min(c, 64)
        block_m = max(1, min(m, _TILE // block_c))
    else:
        block_m = min(m, 2048)
        block_c = max(1, min(c, _TILE // 2 // block_m))
    num_warps = 8 if block_m * block_c >= 2048 else 4
    return block_m, block_c, num_warps


@triton.jit
def _unit(N, C, S, ghost_size, BLOCK_C: tl.constexpr):
    """This program's ghost batch, channel block (and mask), first sample and values per channel."""
    ghost = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    first = ghost * ghost_size
    total = tl.minimum(ghost_size, N - first) * S  # values per channel in this ghost batch
    return ghost, cols, cols < C, first, total


@triton.jit
def _tile(first, start, cols, cmask, total, S, sn, sc, ss, BLOCK_M: tl.constexpr):
    """Offsets and mask of the [BLOCK_M, BLOCK_C] tile of values start.. of the ghost batch."""
    m = start + tl.arange(0, BLOCK_M)
    n = (first + m // S).to(tl.int64)
    s = (m % S).to(tl.int64)
    offs = n[:, None] * sn + s[:, None] * ss + cols.to(tl.int64)[None, :] * sc
    return offs, (m < total)[:, None] & cmask[None, :]


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, rstd_ptr,
    N, C, S, sn, sc, ss, ghost_size, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    count = tl.zeros([BLOCK_C], ACC)
    for start in range(0, total, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, total, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        n_tile = tl.minimum(total - start, BLOCK_M).to(ACC)
        tile_mean = tl.sum(x, axis=0) / n_tile
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(d * d, axis=0)
        merged = count + n_tile  # Chan et al.: merge (count, mean, m2) with the tile's
        delta = tile_mean - mean
        mean += delta * (n_tile / merged)
        m2 += tile_m2 + delta * delta * (count * n_tile / merged)
        count = merged
    var = m2 / count
    rstd = 1.0 / tl.sqrt(var + eps)
    stat = ghost * C + cols
    tl.store(mean_ptr + stat, mean, mask=cmask)
    tl.store(var_ptr + stat, var, mask=cmask)
    tl.store(rstd_ptr + stat, rstd, mask=cmask)
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    for start in range(0, total, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, total, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = x * scale[None, :] + shift[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    N, C, S, sn, sc, ss, ghost_size,
    HAS_W: tl.constexpr, HAS_DX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    stat = ghost * C + cols
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
    for start in range(0, total, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, total, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
    tl.store(sum_dy_ptr + stat, sum_dy, mask=cmask)
    tl.store(sum_dy_xhat_ptr + stat, sum_dy_xhat, mask=cmask)
    if HAS_DX:
        scale = rstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)
        mean_dy = sum_dy / total
        mean_dy_xhat = sum_dy_xhat / total
        for start in range(0, total, BLOCK_M):
            offs, mask = _tile(first, start, cols, cmask, total, S, sn, sc, ss, BLOCK_M)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
            xhat = (x - mean[None, :]) * rstd[None, :]
            dx = (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :]) * scale[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _geometry(x: Tensor, last: bool) -> tuple[int, int, int, int, int, int]:
    """(N, C, S) and the strides of n, c, s for ``x`` contiguous in its memory format."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    return (n, c, s, c * s, 1, c) if last else (n, c, s, c * s, s, 1)


def _acc(x: Tensor):
    import torch

    return tl.float64 if x.dtype == torch.float64 else tl.float32


def forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    ghost_batch_size: int,
    eps: float,
    last: bool,
    out: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ghost-normalise ``x`` (contiguous in its memory format, N >= 1) into ``out`` (same layout).

    ``weight`` and ``bias`` are contiguous ``(C,)`` tensors in the statistics' dtype, or None.
    Returns the per-ghost mean, biased variance and 1/sqrt(var + eps), each ``(G, C)``, in float32
    (float64 for float64 input).
    """
    import torch

    n, c, s, sn, sc, ss = _geometry(x, last)
    g = -(-n // ghost_batch_size)
    stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Three tensors, not views of one: the custom op's outputs must not alias each other.
    mean, var, rstd = (torch.empty((g, c), dtype=stat_dtype, device=x.device) for _ in range(3))
    block_m, block_c, warps = blocks(c, min(ghost_batch_size, n) * s, last)
    grid = (g, triton.cdiv(c, block_c))
    _forward_kernel[grid](
        x, out, weight, bias, mean, var, rstd, n, c, s, sn, sc, ss, ghost_batch_size, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, ACC=_acc(x),
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return mean, var, rstd


def backward(
    x: Tensor,
    dy: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    ghost_batch_size: int,
    last: bool,
    dx: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Write the input gradient into ``dx`` (if not None); return the weight and bias gradients.

    ``x``, ``dy`` and ``dx`` share one layout (contiguous in ``x``'s memory format); ``mean`` and
    ``rstd`` are what :func:`forward` returned. The gradients are ``(C,)`` in the statistics' dtype,
    summed over the per-ghost partials in a fixed order.
    """
    import torch

    n, c, s, sn, sc, ss = _geometry(x, last)
    g = mean.shape[0]
    partials = torch.empty((2, g, c), dtype=mean.dtype, device=x.device)
    block_m, block_c, warps = blocks(c, min(ghost_batch_size, n) * s, last)
    grid = (g, triton.cdiv(c, block_c))
    _backward_kernel[grid](
        x, dy, dx, weight, mean, rstd, partials[0], partials[1],
        n, c, s, sn, sc, ss, ghost_batch_size,
        HAS_W=weight is not None, HAS_DX=dx is not None, ACC=_acc(x),
        BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps,
    )  # fmt: skip
    return partials[1].sum(0), partials[0].sum(0)
