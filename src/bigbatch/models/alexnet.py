"""AlexNet with batch norm for ImageNet (the paper's AlexNet row of Table 1).

The official bigBatch code imports an ``alexnet`` module that its repository does not contain; its
author's convNet.pytorch ``AlexNetOWT_BN`` is the model used there: the "one weird trick" AlexNet
(Krizhevsky 2014; 64-192-384-256-256 channels) with BN after every layer and no conv/hidden-FC
biases:

    conv11x11/4(64) -> maxpool 3/2 -> BN -> ReLU -> conv5x5(192) -> maxpool 3/2 -> ReLU -> BN ->
    conv3x3(384) -> ReLU -> BN -> conv3x3(256) -> ReLU -> BN -> conv3x3(256) -> maxpool 3/2 -> ReLU
    -> BN -> FC 4096 -> BN -> ReLU -> dropout 0.5 -> FC 4096 -> BN -> ReLU -> dropout 0.5 -> FC

(the ReLU/BN order in layers 2-5 is the original's). Deviation: an adaptive average pool to 6x6
before the classifier (torchvision's choice) so that inputs other than 224 px work; it is the
identity at 224. Inputs must be at least 63 px. PyTorch's default initialisation, as in the
original. 61,110,184 parameters for ImageNet (Krizhevsky et al. 2012: "60 million").

Regime (convNet.pytorch ``AlexNetOWT_BN``): SGD lr 0.01, momentum 0.9, weight decay 5e-4; lr 5e-3 at
epoch 10; 1e-3 and weight decay 0 at 15; 5e-4 at 20; 1e-4 at 25; 30 epochs in total (our choice:
five epochs after the last drop, as its earlier phases last). The paper's own ImageNet schedule is
not public.
"""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.models.registry import register, step_regime

__all__ = ["AlexNetBN"]

_MIN_IMAGE_SIZE = 63  # smallest input for which all three 3/2 max-pools still have a 3x3 window


class AlexNetBN(nn.Module):
    """AlexNet ("one weird trick" widths) with batch norm; see the module docstring.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        dropout: dropout probability after each hidden FC layer.

    Shape:
        Input ``(N, in_channels, H, W)`` with H, W >= 63; output ``(N, num_classes)``.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, *, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2, bias=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 192, kernel_size=5, padding=2, bias=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(192),
            nn.Conv2d(192, 384, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(384),
            nn.Conv2d(384, 256, kernel_size=3, padding=1, bias=False),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(256),
            nn.Conv2d(256, 256, kernel_size=3, padding=1, bias=False),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(256),
        )
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Linear(256 * 6 * 6, 4096, bias=False),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096, bias=False),
            nn.BatchNorm1d(4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register(
    "alexnet",
    default_dataset="imagenet",
    default_regime=step_regime(
        30,
        0.01,
        momentum=0.9,
        weight_decay=5e-4,
        drops={10: 5e-3, 15: {"lr": 1e-3, "weight_decay": 0.0}, 20: 5e-4, 25: 1e-4},
    ),
    default_clip_grad_norm=5.0,
    paper_params=60_000_000,  # Krizhevsky et al. 2012: "60 million parameters"
    description="AlexNet with BatchNorm (one-weird-trick widths) for ImageNet",
)
def alexnet(
    *, num_classes: int, in_channels: int, image_size: int, dropout: float = 0.5
) -> AlexNetBN:
    """AlexNet-BN; ``image_size`` must be at least 63 (224 for ImageNet)."""
    if image_size < _MIN_IMAGE_SIZE:
        raise ConfigError(f"alexnet needs image_size >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"alexnet option dropout must be in [0, 1), got {dropout!r}")
    return AlexNetBN(num_classes, in_channels, dropout=dropout)
