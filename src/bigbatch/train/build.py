"""Building a run: the model (ghost batch norm when asked) and the checks made before training.

Everything here runs once, at set-up, before any file is written: a bad combination (a 1-sample
ghost batch, a process left without samples) fails with a one-line :class:`ConfigError` instead of
deep inside the first update.

Example:
    >>> from bigbatch.train.config import RunConfig
    >>> _autocast(RunConfig(model="f1", dataset="synthetic"), torch.device("cpu")) is None
    True
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bigbatch.errors import ConfigError
from bigbatch.train.config import RunConfig

__all__ = ["build_model"]

log = logging.getLogger("bigbatch.train")


def build_model(config: RunConfig, info: Any) -> nn.Module:
    """The run's model: ``models.create`` for the dataset's shape, then ghost batch norm if asked.

    Args:
        config: uses ``model``, ``model_options`` and ``ghost_batch_size``.
        info: the dataset's ``DatasetInfo`` (``num_classes``, ``in_channels``, ``image_size``).
    """
    from bigbatch import models

    model = models.create(
        config.model,
        num_classes=info.num_classes,
        in_channels=info.in_channels,
        image_size=info.image_size,
        **config.model_options,
    )
    if config.ghost_batch_size is not None:
        from bigbatch.layers import convert_ghost_batchnorm

        model = convert_ghost_batchnorm(model, ghost_batch_size=config.ghost_batch_size)
    return model


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _check_batch_split(
    config: RunConfig, model: nn.Module, batch_sizes: set[int], world_size: int
) -> None:
    """Refuse a batch split that batch norm cannot use; warn of micro-batches with plain BN.

    ``batch_sizes`` are the global batch sizes of an epoch; under DDP the checks apply to the
    per-process slices.
    """
    sizes = _shard_sizes(batch_sizes, world_size)
    _check_normalisation_groups(config, sizes, _has_batchnorm(model))
    if config.micro_batch_size and _has_batchnorm(model) and config.ghost_batch_size is None:
        log.warning(
            "micro_batch_size=%d with plain batch norm: statistics are per micro-batch "
            "(as ghost batch norm with ghost size %d would), not over the whole batch",
            config.micro_batch_size,
            config.micro_batch_size,
        )


def _check_normalisation_groups(config: RunConfig, batch_sizes: set[int], has_bn: bool) -> None:
    """Refuse, before training, a batch split that leaves batch norm a group of 1 sample."""
    if not has_bn:
        return
    splits = [s for s in (config.ghost_batch_size, config.micro_batch_size) if s]
    if not splits:
        return  # one BN group per batch; the loader never yields a batch of 1
    group = min(splits)
    for size in sorted(batch_sizes):
        if size % group == 1:
            what = "ghost batch" if config.ghost_batch_size == group else "micro-batch"
            raise ConfigError(
                f"a batch of {size} samples split into {what}es of {group} leaves a last {what} "
                f"of 1 sample, which batch norm cannot normalise; choose a {what} size "
                f"that leaves a remainder other than 1 (or change --train-subset/--batch-size)"
            )


def _shard_sizes(batch_sizes: set[int], world_size: int) -> set[int]:
    """The per-process slice sizes of these global batches (the loader's ``shard`` split)."""
    from bigbatch.data.pipeline import shard_bounds

    sizes = set()
    for size in batch_sizes:
        for rank in range(world_size):
            start, stop = shard_bounds(size, (rank, world_size))
            if stop == start:
                raise ConfigError(
                    f"a batch of {size} samples (the last of an epoch) leaves process {rank} of "
                    f"{world_size} without samples; change --batch-size or --train-subset so that "
                    f"the last batch has at least {world_size} samples"
                )
            sizes.add(stop - start)
    return sizes


def _autocast(config: RunConfig, device: torch.device):
    if config.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


def _uses_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())
