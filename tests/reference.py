"""Naive reference implementations, written from the spec alone (never from the code they check).

Ghost batch norm, as the paper's Algorithm 1 and the official code define it: run the matching
``nn.BatchNorm`` over each slice of ``x.split(ghost_batch_size)`` in turn and concatenate.
"""

from __future__ import annotations

import torch
from torch import nn


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
