"""Naive reference implementations, written from the spec alone (never from the code they check).

Ghost batch norm, as the paper's Algorithm 1 and the official code define it: run the matching
``nn.BatchNorm`` over each slice of ``x.split(ghost_batch_size)`` in turn and concatenate. Below
it, the helpers every ghost batch norm test shares: a layer paired with its reference, inputs, and
one step compared on both.
"""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.layers import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

# (ghost class, matching nn class, input shape after the batch and channel dims)
CASES = {
    "1d": (GhostBatchNorm1d, nn.BatchNorm1d, ()),
    "1d_length": (GhostBatchNorm1d, nn.BatchNorm1d, (5,)),
    "2d": (GhostBatchNorm2d, nn.BatchNorm2d, (3, 2)),
    "3d": (GhostBatchNorm3d, nn.BatchNorm3d, (2, 2, 3)),
}


class ChunkedBatchNorm(nn.Module):
    """A plain ``nn.BatchNorm`` applied slice by slice in training, whole in evaluation."""

    def __init__(self, bn: nn.Module, ghost_batch_size: int) -> None:
        super().__init__()
        self.bn = bn
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.bn(x)
        return torch.cat([self.bn(chunk) for chunk in x.split(self.ghost_batch_size)])


def chunk_batchnorm_model(model: nn.Module, ghost_batch_size: int) -> nn.Module:
    """Wrap every nn.BatchNorm1d/2d/3d child of ``model`` (in place) in ``ChunkedBatchNorm``."""
    for name, child in model.named_children():
        if type(child) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            setattr(model, name, ChunkedBatchNorm(child, ghost_batch_size))
        else:
            chunk_batchnorm_model(child, ghost_batch_size)
    return model


def make_pair(case, num_features, ghost_batch_size, dtype=torch.float64, device=None, **kwargs):
    """A ghost layer and the chunked-BN reference with equal (random) parameters and buffers.

    ``case`` is a key of ``CASES`` (or a ghost class / nn class pair); ``kwargs`` go to both.
    """
    ghost_cls, bn_cls = CASES[case][:2] if isinstance(case, str) else case
    ghost = ghost_cls(num_features, ghost_batch_size, dtype=dtype, device=device, **kwargs)
    bn = bn_cls(num_features, dtype=dtype, device=device, **kwargs)
    with torch.no_grad():
        for p in ghost.parameters():
            p.uniform_(0.5, 1.5)
        if ghost.track_running_stats:
            ghost.running_mean.normal_()
            ghost.running_var.uniform_(0.5, 2.0)
            ghost.num_batches_tracked.fill_(3)
    bn.load_state_dict(ghost.state_dict())
    return ghost, ChunkedBatchNorm(bn, ghost_batch_size)


def make_input(case, batch, num_features, dtype=torch.float64, device=None, memory_format=None):
    """A leaf input, offset and scaled so that a wrong mean or variance cannot hide."""
    x = torch.randn(batch, num_features, *CASES[case][2], dtype=dtype, device=device) * 3 + 2
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return x.requires_grad_()


def assert_same_step(ghost, ref, x, *, tol, check_grads=True, call=None, ref_dtype=None):
    """One forward (and backward, with a random output gradient) on both; compare everything the
    spec names: output, input and parameter gradients, buffers.

    ``call``: what runs the ghost layer (e.g. its torch.compile wrapper), default the layer.
    ``ref_dtype``: run the reference on the input cast to this dtype (for float16/bfloat16 input,
    whose reference is float32 batch norm); the results are compared in that dtype.
    """
    x_ref = x.detach().clone()
    x_ref = (x_ref if ref_dtype is None else x_ref.to(ref_dtype)).requires_grad_()
    y, y_ref = (ghost if call is None else call)(x), ref(x_ref)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.to(y_ref.dtype), y_ref, **tol)
    if check_grads:
        # A random output gradient: with y.sum() the true input gradient of BN is ~0, which would
        # hide a wrong backward.
        grad_out = torch.randn_like(y_ref)
        y.backward(grad_out.to(y.dtype))
        y_ref.backward(grad_out)
        torch.testing.assert_close(x.grad.to(x_ref.dtype), x_ref.grad, **tol)
        for p, p_ref in zip(ghost.parameters(), ref.bn.parameters(), strict=True):
            torch.testing.assert_close(p.grad.to(p_ref.dtype), p_ref.grad, **tol)
    for name, buf in ghost.named_buffers():
        buf_ref = getattr(ref.bn, name)
        torch.testing.assert_close(buf.to(buf_ref.dtype), buf_ref, **tol)
