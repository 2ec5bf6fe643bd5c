"""CIFAR ResNets of He et al. (2016, "Deep Residual Learning", section 4.2), including the paper's
ResNet44.

Structure: conv3x3(16) -> BN -> ReLU -> 3 stages of ``n`` basic blocks with 16, 32, 64 channels (the
2nd and 3rd stages start with stride 2) -> global average pool -> FC; depth = 6n + 2. Basic blocks
are post-activation (conv-BN-ReLU-conv-BN, add, ReLU), as in He et al. and the official bigBatch
code.

Shortcuts where the shape changes:

* ``"B"`` (default): 1x1 strided convolution + BN, what the official code (``models/resnet.py`` of
  eladhoffer/bigBatch) uses, so this is the network the paper trained. ResNet44: 661,338 parameters.
* ``"A"``: parameter-free strided identity with zero-padded channels, He et al.'s CIFAR choice; the
  published counts are for it (ResNet20 0.27M, ResNet44 0.66M, ResNet56 0.85M, ResNet110 1.7M).
  ResNet44: 658,586 parameters.

Initialisation as in the official code: convolutions Kaiming normal (fan_out, ReLU gain), BN weight
1 and bias 0, the FC layer PyTorch's default.

Regime (official code): SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr x0.1 at epochs 81, 122 and
164. Total epochs 200, the official scripts' ``--epochs`` default (He et al. stop at 64k updates,
about 164 epochs; the official regime's last drop at 164 only takes effect with more).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.models.registry import register, step_regime

__all__ = ["BasicBlock", "CifarResNet", "resnet"]

RESNET_REGIME = step_regime(
    200, 0.1, momentum=0.9, weight_decay=1e-4, drops={81: 0.01, 122: 0.001, 164: 0.0001}
)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and append zero channels (no parameters)."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(out_channels - in_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Three-stage ResNet of basic blocks for small images (CIFAR, MNIST), any input size.

    Shared by :func:`resnet` (He et al.) and the wide ResNet of :mod:`bigbatch.models.wide_resnet`.

    Args:
        blocks_per_stage: ``n``, basic blocks in each of the three stages.
        num_classes: outputs.
        in_channels: input channels.
        widths: channels of the stem and stage 1, stage 2, stage 3.
        shortcut: ``"A"`` (zero-pad identity) or ``"B"`` (1x1 conv + BN) where the shape changes.

    Shape:
        Input ``(N, in_channels, H, W)``; output ``(N, num_classes)``. The official code pools with
        a fixed 8x8 window; the global average pool here is the same for 32 px and also fits 28 or 8
        px.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: str = "B",
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for index, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(BasicBlock(channels, width, stride, shortcut))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # normal(0, sqrt(2 / (k*k*out_channels))), the official code's init_model.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _check_shortcut(shortcut: str) -> None:
    if shortcut not in ("A", "B"):
        raise ConfigError(
            f"shortcut must be 'A' (zero-pad identity) or 'B' (1x1 conv + BN), got {shortcut!r}"
        )


def resnet(
    depth: int = 44,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    shortcut: str = "B",
) -> CifarResNet:
    """He et al.'s CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110, ...).

    Args:
        depth: total weighted layers, 6n + 2 with n >= 1.
        num_classes: outputs.
        in_channels: input channels.
        shortcut: ``"B"`` (official bigBatch code) or ``"A"`` (He et al.'s published counts).

    Returns:
        A :class:`CifarResNet`.

    Raises:
        ConfigError: depth is not 6n + 2, or shortcut is not "A"/"B".

    Example:
        >>> sum(p.numel() for p in resnet(20, shortcut="A").parameters())
        269722
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            "ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
            f"got {depth!r}"
        )
    _check_shortcut(shortcut)
    return CifarResNet(
        (depth - 2) // 6, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut
    )


@register(
    "resnet44",
    default_dataset="cifar10",
    default_regime=RESNET_REGIME,
    default_clip_grad_norm=5.0,
    paper_params=660_000,  # He et al. 2016, Table 6 (option A)
    description="ResNet44: He et al.'s CIFAR ResNet, 3x7 basic blocks, 16/32/64 channels",
)
def resnet44(
    *, num_classes: int, in_channels: int, image_size: int, shortcut: str = "B"
) -> CifarResNet:
    """ResNet44 (He et al. 2016) as trained by the paper; ``image_size`` is not needed (global
    pool)."""
    return resnet(44, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


@register(
    "resnet",
    default_dataset="cifar10",
    default_regime=RESNET_REGIME,
    default_clip_grad_norm=5.0,
    paper_params=660_000,  # depth 44 by default; He et al. 2016, Table 6 (option A)
    description="CIFAR ResNet of any depth 6n+2 (option depth, default 44), ResNet44's regime",
)
def resnet_any_depth(
    *, num_classes: int, in_channels: int, image_size: int, depth: int = 44, shortcut: str = "B"
) -> CifarResNet:
    """CIFAR ResNet of depth ``6n + 2``; ``image_size`` is not needed (global pool)."""
    return resnet(depth, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
