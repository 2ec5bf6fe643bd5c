"""VGG for CIFAR (the paper's "VGG" row of Table 1), VGG-16 with batch norm by default.

The official bigBatch code has no VGG, so this is the standard CIFAR adaptation of Simonyan &
Zisserman's configuration D: thirteen conv3x3 -> BN -> ReLU layers (64, 64, M, 128, 128, M, 256 x3,
M, 512 x3, M, 512 x3, M; M = 2x2 max-pool), which leaves 512 x 1 x 1 features at 32 px, then a
classifier 512 -> 512 -> BN -> ReLU -> dropout 0.5 -> num_classes, the head of Zagoruyko's
cifar.torch VGG (2015) and of the "VGG-16" of Li et al. 2017 ("Pruning Filters for Efficient
ConvNets", Table 1: 1.5e7 parameters). ``hidden=0`` gives the single 512 -> num_classes layer many
PyTorch CIFAR repos use. Convolutions have no bias (BN follows them); Kaiming normal (fan_out) init
for convolutions. 14,987,210 parameters for CIFAR-10.

Max-pools use ``ceil_mode=True`` so any image size works (28 px: 28-14-7-4-2-1; identical to the
usual floor pooling for 32 px), and an adaptive average pool before the classifier handles sizes
above 32.

Regime: none is published for the paper's VGG. We use the ResNet44 schedule with VGG's usual weight
decay: SGD lr 0.1, momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 81 and 122, 164 epochs (the
CIFAR VGG-BN recipe of the pytorch-classification repository, bearpaw).
"""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.models.registry import register, step_regime

__all__ = ["VGG"]

# Simonyan & Zisserman's configurations A, B, D, E as channel multiples of the first stage's width;
# 0 marks a 2x2 max-pool.
_CONFIGS = {
    11: (1, 0, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0),
    13: (1, 1, 0, 2, 2, 0, 4, 4, 0, 8, 8, 0, 8, 8, 0),
    16: (1, 1, 0, 2, 2, 0, 4, 4, 4, 0, 8, 8, 8, 0, 8, 8, 8, 0),
    19: (1, 1, 0, 2, 2, 0, 4, 4, 4, 4, 0, 8, 8, 8, 8, 0, 8, 8, 8, 8, 0),
}


class VGG(nn.Module):
    """VGG feature extractor with BN, global pool, and an optional hidden FC layer.

    Args:
        depth: 11, 13, 16 or 19.
        num_classes: outputs.
        in_channels: input channels.
        width: channels of the first stage (64); later stages use 2x, 4x, 8x, 8x.
        hidden: width of the hidden FC layer; 0 for a single linear classifier.
        dropout: dropout before the last layer when ``hidden`` > 0.

    Shape:
        Input ``(N, in_channels, H, W)``; output ``(N, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 16,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        hidden: int = 512,
        dropout: float = 0.5,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for multiple in _CONFIGS[depth]:
            if multiple == 0:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                continue
            out = width * multiple
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = []
        if hidden:
            head += [
                nn.Linear(channels, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
            ]
            channels = hidden
        head.append(nn.Linear(channels, num_classes))
        self.classifier = nn.Sequential(*head)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register(
    "vgg",
    default_dataset="cifar10",
    default_regime=step_regime(
        164, 0.1, momentum=0.9, weight_decay=5e-4, drops={81: 0.01, 122: 0.001}
    ),
    default_clip_grad_norm=5.0,
    paper_params=15_000_000,  # Li et al. 2017, Table 1: VGG-16 (BN, 512-512 head), CIFAR-10, 1.5e7
    description="VGG: VGG-16 with BatchNorm for CIFAR, 512-512-classes head with dropout",
)
def vgg(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int = 16,
    width: int = 64,
    hidden: int = 512,
    dropout: float = 0.5,
) -> VGG:
    """VGG-16-BN for CIFAR (options: depth 11/13/16/19, width, hidden, dropout)."""
    if depth not in _CONFIGS:
        raise ConfigError(f"vgg depth must be one of {sorted(_CONFIGS)}, got {depth!r}")
    for key, value, low in (("width", width, 1), ("hidden", hidden, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"vgg option {key} must be an integer >= {low}, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"vgg option dropout must be in [0, 1), got {dropout!r}")
    return VGG(
        depth,
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        hidden=hidden,
        dropout=dropout,
    )
