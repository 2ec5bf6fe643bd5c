"""Running statistics of ghost batch norm: k sequential nn.BatchNorm updates applied at once."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["track", "update_running_stats"]


def update_running_stats(
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



def track(
    x: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    ghost_batch_size: int,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
) -> None:
    """Update the running statistics from the per-ghost mean and *biased* variance ``(G, C)``."""
    n, k = x.shape[0], batch_mean.shape[0]
    values_per_sample = math.prod(x.shape[2:])
    full = ghost_batch_size * values_per_sample
    last = (n - (k - 1) * ghost_batch_size) * values_per_sample
    # Values per (ghost batch, channel), built on the stats' device: no host-to-device copy.
    counts = torch.full((k, 1), full, dtype=batch_var.dtype, device=batch_var.device)
    counts[-1] = last
    with torch.no_grad():
        update_running_stats(
            running_mean,
            running_var,
            batch_mean,
            batch_var * counts / (counts - 1),  # unbiased, as nn.BatchNorm stores
            momentum,
            num_batches_tracked,
        )
