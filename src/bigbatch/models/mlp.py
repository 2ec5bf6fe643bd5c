"""F1: the fully connected MNIST network of the paper (Hoffer et al. 2017, Table 1, row F1).

Architecture (official code, ``models/mnist_f1.py`` of eladhoffer/bigBatch): 784 -> 512 x 5 -> 10,
each hidden layer Linear -> BatchNorm1d -> ReLU, PyTorch's default initialisation.

Regime: SGD, lr 0.1, momentum 0.9, weight decay 1e-4, lr x0.1 at epochs 10, 20 and 30 (the official
model's regime). Total epochs 50: the official ``run_experiments.sh`` runs every MNIST experiment
with ``--epochs 50`` (the scripts' own default is 200).
"""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.models.registry import register, step_regime

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten -> ``depth`` x (Linear -> BatchNorm1d -> ReLU) -> Linear.

    Args:
        in_features: number of input values per sample (C*H*W; any input shape is flattened).
        num_classes: number of outputs.
        hidden: width of every hidden layer.
        depth: number of hidden layers.

    Shape:
        Input ``(N, *)`` with ``in_features`` values per sample; output ``(N, num_classes)``.
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: int = 512, depth: int = 5):
        super().__init__()
        self.in_features = in_features
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            # A shape mismatch here usually means the model was built for another dataset.
            raise ValueError(
                f"MLP expects {self.in_features} input values per sample, got {x.shape[1]}; "
                "pass the dataset's in_channels and image_size to bigbatch.models.create"
            )
        return self.layers(x)


@register(
    "f1",
    default_dataset="mnist",
    default_regime=step_regime(
        50, 0.1, momentum=0.9, weight_decay=1e-4, drops={10: 0.01, 20: 0.001, 30: 0.0001}
    ),
    default_clip_grad_norm=5.0,
    paper_params=None,
    description="F1: MLP 784-512x5-10 with BatchNorm (MNIST / Fashion-MNIST)",
)
def f1(
    *, num_classes: int, in_channels: int, image_size: int, hidden: int = 512, depth: int = 5
) -> MLP:
    """F1: fully connected network with ``depth`` BatchNorm+ReLU hidden layers of ``hidden`` units.

    Args:
        num_classes: outputs.
        in_channels: input channels (the input is flattened).
        image_size: input height = width.
        hidden: hidden width (paper: 512).
        depth: number of hidden layers (paper: 5).

    Returns:
        An :class:`MLP`; 1,462,794 parameters for the paper's 1x28x28 MNIST configuration.
    """
    for key, value in (("hidden", hidden), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"f1 option {key} must be a positive integer, got {value!r}")
    return MLP(in_channels * image_size * image_size, num_classes, hidden=hidden, depth=depth)
