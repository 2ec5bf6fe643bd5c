"""WResNet16-4: the wide ResNet of the paper's CIFAR-100 row (Table 1).

The official code (``models/wide_resnet.py`` of eladhoffer/bigBatch) builds it as the He et al.
CIFAR ResNet with every width multiplied by 4 (stem and stages 64/128/256 channels), post-activation
basic blocks, 1x1 conv + BN shortcuts where the shape changes, no dropout, and
``n = int((16 - 2) / 6) = 2`` blocks per stage. That is Zagoruyko & Komodakis's WRN-16-4 block count
(depth = 6n + 4) but *not* their pre-activation block, and the stem outputs 64 channels directly, so
there is no stage-1 projection. We follow the official code: 2,800,804 parameters for CIFAR-100
(2,777,674 with 10 classes). Zagoruyko & Komodakis (2016, Table 1) publish 2.7M for WRN-16-4, whose
pre-activation form counts 2,748,890 with 10 classes.

Regime (official code): SGD lr 0.1, momentum 0.9, weight decay 1e-4, lr 0.02 at epoch 60, 0.004 at
120, 1e-4 at 140. Total epochs 200, the official scripts' ``--epochs`` default (nothing in the
official code runs this model for another length).
"""

from __future__ import annotations

from bigbatch.errors import ConfigError
from bigbatch.models.registry import register, step_regime
from bigbatch.models.resnet import CifarResNet, _check_shortcut

__all__ = ["wide_resnet"]


def wide_resnet(
    depth: int = 16,
    widen_factor: int = 4,
    *,
    num_classes: int = 100,
    in_channels: int = 3,
    shortcut: str = "B",
) -> CifarResNet:
    """Wide CIFAR ResNet (post-activation, as in the official code) of depth 6n + 4.

    Args:
        depth: 6n + 4 (16, 22, 28, 40, ...), Zagoruyko & Komodakis's convention: n blocks per stage.
        widen_factor: channel multiplier k (stages 16k, 32k, 64k).
        num_classes: outputs.
        in_channels: input channels.
        shortcut: ``"B"`` (1x1 conv + BN, official) or ``"A"`` (zero-pad identity).

    Returns:
        A :class:`~bigbatch.models.resnet.CifarResNet`.

    Raises:
        ConfigError: depth is not 6n + 4 or widen_factor is not a positive integer.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ConfigError(
            f"wide ResNet depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}"
        )
    if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
        raise ConfigError(f"widen_factor must be a positive integer, got {widen_factor!r}")
    _check_shortcut(shortcut)
    k = widen_factor
    return CifarResNet(
        (depth - 4) // 6,
        num_classes=num_classes,
        in_channels=in_channels,
        widths=(16 * k, 32 * k, 64 * k),
        shortcut=shortcut,
    )


@register(
    "wresnet16_4",
    default_dataset="cifar100",
    default_regime=step_regime(
        200, 0.1, momentum=0.9, weight_decay=1e-4, drops={60: 0.02, 120: 0.004, 140: 0.0001}
    ),
    default_clip_grad_norm=5.0,
    paper_params=2_700_000,  # Zagoruyko & Komodakis 2016, Table 1 (WRN-16-4, rounded to 0.1M)
    description="WResNet16-4: wide ResNet, depth 16, width x4, no dropout (CIFAR-100)",
)
def wresnet16_4(
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    depth: int = 16,
    widen_factor: int = 4,
) -> CifarResNet:
    """WResNet16-4 as in the official code; ``image_size`` is not needed (global pool)."""
    return wide_resnet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels)
