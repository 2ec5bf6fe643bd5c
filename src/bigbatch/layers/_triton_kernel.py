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

When the (ghost batch, channel block) programs are too few for the GPU (fewer than two per SM),
each ghost batch's values are cut into chunks (``splits``, a third grid axis): the first launch
writes each chunk's (count, mean, m2), or its two gradient sums, as partials; the second merges a
ghost batch's partials in a fixed order and normalises (or writes dx for) its chunk.

Blocks are chosen from the shape (``blocks``), never autotuned: the interpreter cannot autotune.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["backward", "blocks", "forward", "splits"]

_TILE = 4096  # values per tile: 16 KiB of float32 registers per program
_MAX_SPLITS = 64
_INTERPRETER_SMS = 2  # what ``splits`` assumes for CPU tensors (the interpreter): tests reach both


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
def _chan(count, mean, m2, count_b, mean_b, m2_b):
    """Merge (count, mean, m2) with another such set (Chan et al.); either may be empty."""
    merged = count + count_b
    frac = tl.where(merged > 0, count_b / tl.maximum(merged, 1.0), 0.0)
    delta = mean_b - mean
    return merged, mean + delta * frac, m2 + m2_b + delta * delta * count * frac


@triton.jit
def _stats_range(
    x_ptr, lo, hi, first, cols, cmask, S, sn, sc, ss,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """(count, mean, m2) per channel of the values lo..hi of a ghost batch, tile by tile: each
    tile's own two-pass mean and m2, merged into the running ones."""
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(lo, hi, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, hi, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        n_tile = tl.minimum(hi - start, BLOCK_M).to(ACC)
        tile_mean = tl.sum(x, axis=0) / n_tile
        d = tl.where(mask, x - tile_mean[None, :], 0.0)
        count, mean, m2 = _chan(count, mean, m2, n_tile, tile_mean, tl.sum(d * d, axis=0))
    return count, mean, m2


@triton.jit
def _normalize_range(
    x_ptr, y_ptr, w_ptr, b_ptr, lo, hi, first, cols, cmask, S, sn, sc, ss, mean, rstd,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """y = x * (w * rstd) + (b - mean * w * rstd) for the values lo..hi of a ghost batch."""
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)
    shift = -mean * scale
    if HAS_B:
        shift += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    for start in range(lo, hi, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, hi, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        y = x * scale[None, :] + shift[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_stats(mean_ptr, var_ptr, rstd_ptr, stat, cmask, count, mean, m2, eps):
    """Biased variance and 1/sqrt(var + eps) from (count, mean, m2); stored; returns rstd."""
    var = m2 / tl.maximum(count, 1.0)  # count is 0 only on masked channels
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + stat, mean, mask=cmask)
    tl.store(var_ptr + stat, var, mask=cmask)
    tl.store(rstd_ptr + stat, rstd, mask=cmask)
    return rstd


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, rstd_ptr,
    N, C, S, sn, sc, ss, ghost_size, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One launch: each program owns a whole (ghost batch, channel block)."""
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    count, mean, m2 = _stats_range(
        x_ptr, 0, total, first, cols, cmask, S, sn, sc, ss, ACC, BLOCK_M, BLOCK_C
    )
    stat = ghost * C + cols
    rstd = _store_stats(mean_ptr, var_ptr, rstd_ptr, stat, cmask, count, mean, m2, eps)
    _normalize_range(x_ptr, y_ptr, w_ptr, b_ptr, 0, total, first, cols, cmask, S, sn, sc, ss,
                     mean, rstd, HAS_W, HAS_B, ACC, BLOCK_M)  # fmt: skip


@triton.jit
def _forward_split_stats_kernel(
    x_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr,
    N, C, S, sn, sc, ss, ghost_size, chunk,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Split launch 1: (count, mean, m2) of chunk values (axis 2 of the grid) per program."""
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    split = tl.program_id(2)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    count, mean, m2 = _stats_range(
        x_ptr, lo, hi, first, cols, cmask, S, sn, sc, ss, ACC, BLOCK_M, BLOCK_C
    )
    part = (ghost * tl.num_programs(2) + split) * C + cols
    tl.store(part_count_ptr + part, count, mask=cmask)
    tl.store(part_mean_ptr + part, mean, mask=cmask)
    tl.store(part_m2_ptr + part, m2, mask=cmask)


@triton.jit
def _forward_split_normalize_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, part_count_ptr, part_mean_ptr, part_m2_ptr,
    mean_ptr, var_ptr, rstd_ptr, N, C, S, sn, sc, ss, ghost_size, chunk, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Split launch 2: merge the ghost batch's partials in order, then normalise one chunk."""
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for j in range(0, splits):
        part = (ghost * splits + j) * C + cols
        count, mean, m2 = _chan(
            count, mean, m2, tl.load(part_count_ptr + part, mask=cmask, other=0.0),
            tl.load(part_mean_ptr + part, mask=cmask, other=0.0),
            tl.load(part_m2_ptr + part, mask=cmask, other=0.0),
        )  # fmt: skip
    # Every split computes the same statistics; the first stores them.
    stat = ghost * C + cols
    first_split = cmask & ((cols * 0 + split) == 0)  # a vector mask (a scalar one is refused)
    rstd = _store_stats(mean_ptr, var_ptr, rstd_ptr, stat, first_split, count, mean, m2, eps)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    _normalize_range(x_ptr, y_ptr, w_ptr, b_ptr, lo, hi, first, cols, cmask, S, sn, sc, ss,
                     mean, rstd, HAS_W, HAS_B, ACC, BLOCK_M)  # fmt: skip


@triton.jit
def _grad_sums_range(
    x_ptr, dy_ptr, lo, hi, first, cols, cmask, S, sn, sc, ss, mean, rstd,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """sum(dy) and sum(dy * x_hat) per channel over the values lo..hi of a ghost batch."""
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
    for start in range(lo, hi, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, hi, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xhat += tl.sum(dy * xhat, axis=0)
    return sum_dy, sum_dy_xhat


@triton.jit
def _grad_input_range(
    x_ptr, dy_ptr, dx_ptr, w_ptr, lo, hi, total, first, cols, cmask, S, sn, sc, ss,
    mean, rstd, sum_dy, sum_dy_xhat,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dx = w * rstd * (dy - sum(dy)/M - x_hat * sum(dy * x_hat)/M) for the values lo..hi."""
    scale = rstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0).to(ACC)
    mean_dy = sum_dy / total
    mean_dy_xhat = sum_dy_xhat / total
    for start in range(lo, hi, BLOCK_M):
        offs, mask = _tile(first, start, cols, cmask, hi, S, sn, sc, ss, BLOCK_M)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
        xhat = (x - mean[None, :]) * rstd[None, :]
        dx = (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :]) * scale[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    N, C, S, sn, sc, ss, ghost_size, chunk,
    HAS_W: tl.constexpr, HAS_DX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The partial sums of chunk values (axis 2 of the grid) per program; with one split (chunk
    covering the ghost batch) also the input gradient, in the same launch."""
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    split = tl.program_id(2)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    stat = ghost * C + cols
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
    sum_dy, sum_dy_xhat = _grad_sums_range(
        x_ptr, dy_ptr, lo, hi, first, cols, cmask, S, sn, sc, ss, mean, rstd, ACC, BLOCK_M,
        BLOCK_C,
    )  # fmt: skip
    part = (ghost * tl.num_programs(2) + split) * C + cols
    tl.store(sum_dy_ptr + part, sum_dy, mask=cmask)
    tl.store(sum_dy_xhat_ptr + part, sum_dy_xhat, mask=cmask)
    if HAS_DX:
        _grad_input_range(
            x_ptr, dy_ptr, dx_ptr, w_ptr, lo, hi, total, first, cols, cmask, S, sn, sc, ss,
            mean, rstd, sum_dy, sum_dy_xhat, HAS_W, ACC, BLOCK_M,
        )  # fmt: skip


@triton.jit
def _backward_split_input_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, mean_ptr, rstd_ptr, sum_dy_ptr, sum_dy_xhat_ptr,
    N, C, S, sn, sc, ss, ghost_size, chunk,
    HAS_W: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Split launch 2: the ghost batch's partial sums added in order, then dx for one chunk."""
    ghost, cols, cmask, first, total = _unit(N, C, S, ghost_size, BLOCK_C)
    split = tl.program_id(2)
    splits = tl.num_programs(2)
    stat = ghost * C + cols
    mean = tl.load(mean_ptr + stat, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=cmask, other=0.0)
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
    for j in range(0, splits):
        part = (ghost * splits + j) * C + cols
        sum_dy += tl.load(sum_dy_ptr + part, mask=cmask, other=0.0)
        sum_dy_xhat += tl.load(sum_dy_xhat_ptr + part, mask=cmask, other=0.0)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, total)
    _grad_input_range(x_ptr, dy_ptr, dx_ptr, w_ptr, lo, hi, total, first, cols, cmask, S,
                      sn, sc, ss, mean, rstd, sum_dy, sum_dy_xhat, HAS_W, ACC, BLOCK_M)  # fmt: skip


def _geometry(x: Tensor, last: bool) -> tuple[int, int, int, int, int, int]:
    """(N, C, S) and the strides of n, c, s for ``x`` contiguous in its memory format."""
    n, c = x.shape[:2]
    s = x.numel() // max(n * c, 1)
    return (n, c, s, c * s, 1, c) if last else (n, c, s, c * s, s, 1)


def _acc(x: Tensor):
    import torch

    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _sm_count(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def splits(units: int, values: int, block_m: int, device) -> tuple[int, int]:
    """(splits, chunk): each ghost batch's ``values`` per channel cut into ``splits`` chunks of
    ``chunk`` values (a multiple of ``block_m``) when ``units`` (ghost batch x channel block)
    programs alone would leave the GPU idle (fewer than two per SM); (1, values) otherwise."""
    tiles = triton.cdiv(values, block_m)
    target = 2 * _sm_count(device)
    if units >= target or tiles == 1:
        return 1, values
    want = min(tiles, triton.cdiv(target, units), _MAX_SPLITS)
    chunk = triton.cdiv(tiles, want) * block_m
    return triton.cdiv(values, chunk), chunk


def _plan(x: Tensor, ghost_batch_size: int, last: bool):
    n, c, s, sn, sc, ss = _geometry(x, last)
    g = -(-n // ghost_batch_size)
    values = min(ghost_batch_size, n) * s
    block_m, block_c, warps = blocks(c, values, last)
    split, chunk = splits(g * triton.cdiv(c, block_c), values, block_m, x.device)
    grid = (g, triton.cdiv(c, block_c), split)
    meta = dict(ACC=_acc(x), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    return (n, c, s, sn, sc, ss), g, chunk, grid, meta


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
    (float64 for float64 input). One launch, or two when each ghost batch is split (``splits``).
    """
    import torch

    geometry, g, chunk, grid, meta = _plan(x, ghost_batch_size, last)
    c = geometry[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    # Three tensors, not views of one: the custom op's outputs must not alias each other.
    mean, var, rstd = (torch.empty((g, c), dtype=dtype, device=x.device) for _ in range(3))
    affine = dict(HAS_W=weight is not None, HAS_B=bias is not None)
    if grid[2] == 1:
        _forward_kernel[grid](
            x, out, weight, bias, mean, var, rstd, *geometry, ghost_batch_size, eps, **affine,
            **meta,
        )  # fmt: skip
        return mean, var, rstd
    parts = torch.empty((3, g, grid[2], c), dtype=dtype, device=x.device)
    _forward_split_stats_kernel[grid](
        x, parts[0], parts[1], parts[2], *geometry, ghost_batch_size, chunk, **meta
    )
    _forward_split_normalize_kernel[grid](
        x, out, weight, bias, parts[0], parts[1], parts[2], mean, var, rstd, *geometry,
        ghost_batch_size, chunk, eps, **affine, **meta,
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
    the per-(ghost batch, split) partials summed by torch in a fixed order (no atomics).
    """
    import torch

    geometry, g, chunk, grid, meta = _plan(x, ghost_batch_size, last)
    parts = torch.empty((2, g, grid[2], geometry[1]), dtype=mean.dtype, device=x.device)
    single = grid[2] == 1
    _backward_kernel[grid](
        x, dy, dx, weight, mean, rstd, parts[0], parts[1], *geometry, ghost_batch_size, chunk,
        HAS_W=weight is not None, HAS_DX=single and dx is not None, **meta,
    )  # fmt: skip
    if not single and dx is not None:
        _backward_split_input_kernel[grid](
            x, dy, dx, weight, mean, rstd, parts[0], parts[1], *geometry, ghost_batch_size,
            chunk, HAS_W=weight is not None, **meta,
        )  # fmt: skip
    return parts[1].sum((0, 1)), parts[0].sum((0, 1))
