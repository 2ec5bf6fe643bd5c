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

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bigbatch import distributed
from bigbatch.errors import ConfigError
from bigbatch.train.config import RunConfig, resolve_regime
from bigbatch.train.state import Plan, TrainState

__all__ = [
    "Run",
    "build_model",
    "build_run",
    "check_ghost_alignment",
    "check_process_split",
    "load_weights",
    "schedule_lines",
    "shard_batch_size",
]

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


def load_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Put the weights of checkpoint ``path`` into ``model`` (``--init-from``), all or nothing.

    ``path`` is a bigbatch checkpoint (its ``model`` entry is used) or a plain ``state_dict``;
    it is read with ``torch.load(weights_only=True)``. Ghost batch norm keeps batch norm's keys,
    so weights move between runs with and without it.

    Returns:
        What ``path`` holds (the whole checkpoint), read once.

    Raises:
        CheckpointError: the file is missing or unreadable.
        ConfigError: its tensors do not fit ``model`` (the message names the first key that
            differs and both shapes).
    """
    from bigbatch.train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    weights = state.get("model", state)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        what = (f"lacks {missing[0]!r}" if missing
                else f"has {unexpected[0]!r}, which the model lacks")
        raise ConfigError(f"--init-from {path}: the checkpoint {what} ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected keys); it is another model's weights")
    for name, tensor in own.items():
        other = weights[name]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise ConfigError(
                f"--init-from {path}: {name!r} has shape {shape} in the checkpoint but "
                f"{tuple(tensor.shape)} in this model; use the same model, model options and "
                "dataset (classes, channels, image size) as the run that saved it"
            )
    model.load_state_dict(weights)
    return state


@dataclasses.dataclass
class Run:
    """A run ready to train: its plan, its state, and what the loop uses beside them.

    Attributes:
        run_dir: the run directory.
        ctx: this process's ``bigbatch.distributed.DistContext``.
        plan: the resolved, fixed facts (:class:`~bigbatch.train.state.Plan`).
        state: what training changes (:class:`~bigbatch.train.state.TrainState`).
        train_model: the model the loop calls (``state.model`` wrapped in DDP /
            ``torch.compile`` when asked).
        train_loader, val_loader, info: the loaders and the ``DatasetInfo``.
        autocast: the forward pass's autocast context (``None``: none).
        channels_last: whether batches are put in channels-last memory format.
        params: the parameters that get gradients (clipped and checked).
    """

    run_dir: Path
    ctx: Any
    plan: Plan
    state: TrainState
    train_model: nn.Module
    train_loader: Any
    val_loader: Any
    info: Any
    autocast: Any
    channels_last: bool
    params: list[torch.Tensor]

    @property
    def shard(self) -> tuple[int, int] | None:
        """This process's ``(rank, world_size)`` slice of every batch, ``None`` in one process."""
        return (self.ctx.rank, self.ctx.world_size) if self.ctx.enabled else None

    def no_sync(self) -> Callable[[bool], Any] | None:
        """``forward_backward``'s ``no_sync`` under DDP (``None`` in one process)."""
        if not self.ctx.enabled:
            return None
        return lambda last: distributed.no_sync_context(self.train_model, last)


def check_process_split(config: RunConfig, ctx: Any) -> None:
    """The global batch must split evenly over the processes (checked before any file is written),
    and with ``exact_ghost_alignment`` every process's slice into whole ghost batches."""
    per_rank_batch = shard_batch_size(config.batch_size, ctx.world_size)
    if ctx.enabled:
        check_ghost_alignment(
            per_rank_batch, config.ghost_batch_size, exact=config.exact_ghost_alignment
        )


def shard_batch_size(batch_size: int, world_size: int) -> int:
    """The per-process batch: ``batch_size / world_size``, which must be a whole number.

    Args:
        batch_size: the global batch, summed over all processes (what the paper calls B).
        world_size: number of processes.

    Returns:
        ``batch_size // world_size``.

    Raises:
        ConfigError: ``world_size`` does not divide ``batch_size``; the message names the nearest
            batch sizes that work.

    Example:
        >>> shard_batch_size(4096, 8)
        512
    """
    if world_size < 1 or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} and world_size={world_size} must be positive")
    if batch_size % world_size == 0:
        return batch_size // world_size
    below = batch_size // world_size * world_size
    above = below + world_size
    nearest = f"{below} or {above}" if below > 0 else f"{above}"
    raise ConfigError(
        f"batch_size={batch_size} is the global batch and must be divisible by the number of "
        f"processes ({world_size}); use --batch-size {nearest}, or launch a number of processes "
        f"that divides {batch_size}"
    )


def check_ghost_alignment(
    per_rank_batch: int, ghost_batch_size: int | None, exact: bool = True
) -> None:
    """Check that ghost batches fall inside one process's slice, as in single-process training.

    Single-process ghost BN splits the global batch into consecutive slices of ``ghost_batch_size``.
    Distributed, each process splits its own contiguous slice. The two splits coincide (and training
    is the same, up to float reduction order) exactly when ``ghost_batch_size`` divides
    ``per_rank_batch``; otherwise every process ends with a short ghost batch that single-process
    training does not have.

    Args:
        per_rank_batch: samples per process and update (:func:`shard_batch_size`).
        ghost_batch_size: the ghost batch size, or ``None`` for plain batch norm (nothing to check).
        exact: require single-process equivalence; with ``False`` any size is accepted.

    Raises:
        ConfigError: ``exact`` and ``ghost_batch_size`` does not divide ``per_rank_batch``.

    Example:
        >>> check_ghost_alignment(512, 128)  # 4 ghost batches per process
    """
    if ghost_batch_size is None or not exact:
        return
    if ghost_batch_size < 1:
        raise ConfigError(f"ghost_batch_size={ghost_batch_size} must be positive")
    if per_rank_batch % ghost_batch_size == 0:
        return
    # The nearest ghost sizes that work: the divisors of the per-process batch around the request
    # (a ghost batch of 1 sample cannot be normalised, so 1 is never suggested).
    divisors = [d for d in range(2, per_rank_batch + 1) if per_rank_batch % d == 0]
    below = [d for d in divisors if d < ghost_batch_size][-1:]
    above = [d for d in divisors if d > ghost_batch_size][:1]
    raise ConfigError(
        f"ghost_batch_size={ghost_batch_size} does not divide the per-process batch of "
        f"{per_rank_batch} samples (global batch / number of processes), so the ghost batches "
        f"would differ from single-process training; use --ghost-batch-size "
        f"{' or '.join(map(str, below + above))}, or a global batch that is a multiple of "
        f"{ghost_batch_size} x the number of processes"
    )


def _loaders(config: RunConfig, ctx: Any):
    from bigbatch import data

    # Under torchrun with --download, one process per node fetches the files while the others
    # wait, so that no two processes write the same file.
    first_on_node = ctx.local_rank == 0
    if config.download and not first_on_node:
        distributed.barrier(ctx)
    loaders = data.build_loaders(
        config.dataset,
        data_dir=config.data_dir,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        device=ctx.device,
        seed=config.seed,
        train_subset=config.train_subset,
        held_out=config.held_out,
        download=config.download,
        num_workers=config.num_workers,
    )
    if config.download and first_on_node:
        distributed.barrier(ctx)
    return loaders


def _plan(config: RunConfig, ctx: Any, train_loader: Any) -> Plan:
    from bigbatch.recipes import num_updates

    dataset_size = int(train_loader.num_samples)
    base_regime, regime = resolve_regime(config, dataset_size)
    # The loader's own count of batches (it drops a last batch of one sample, which batch norm
    # cannot train on); recipes.num_updates rounds regime.epochs times it, as a "dataset" of that
    # many one-sample batches.
    upe = len(train_loader)
    return Plan(config, base_regime, regime, dataset_size, upe, max(1, num_updates(regime, upe, 1)),
                ctx.device, ctx.world_size)


def build_run(config: RunConfig, ctx: Any, run_dir: Path) -> Run:
    """Seed, build the loaders, the plan, the model (on ``ctx.device``, wrapped for DDP) and the
    optimizer: everything the loop needs, in the order that fixes the random streams.

    Raises:
        ConfigError: a batch split that batch norm cannot use (checked before training).
    """
    from bigbatch.diagnostics import WeightDistance
    from bigbatch.recipes import build_optimizer

    torch.manual_seed(config.seed)
    if ctx.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    train_loader, val_loader, info = _loaders(config, ctx)
    plan = _plan(config, ctx, train_loader)
    model = build_model(config, info)
    if config.init_from is not None:
        load_weights(model, config.init_from)  # before w0 is taken: distances are from these
    # This process's batch sizes in an epoch (the last batch is partial; its slice under DDP).
    sizes = _shard_sizes({int(ix.numel()) for ix in train_loader.batch_indices(0)},
                         ctx.world_size)
    _check_batch_split(config, model, sizes)
    if ctx.is_main:
        _warn_questionable(config, plan, sizes)
    channels_last = config.channels_last is True or (
        config.channels_last == "auto" and ctx.device.type == "cuda" and _uses_conv(model)
    )
    model = model.to(ctx.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # DDP broadcasts rank 0's weights when wrapping: w0 is taken after, the same on every rank.
    train_model = distributed.wrap_model(model, ctx)
    if ctx.world_size > 1:
        # From here each process draws its own random numbers (dropout masks), as one process
        # drawing for the whole global batch would; weights and data order are already shared.
        torch.manual_seed(distributed.rank_seed(config.seed, ctx.rank))
    weight_distance = WeightDistance(model)
    if config.compile:
        train_model = torch.compile(train_model)
    state = TrainState(model, build_optimizer(model.parameters(), plan.regime), weight_distance)
    return Run(run_dir, ctx, plan, state, train_model, train_loader, val_loader, info,
               _autocast(config, ctx.device), channels_last,
               [p for p in model.parameters() if p.requires_grad])


def schedule_lines(plan: Plan) -> list[str]:
    """The schedule a run follows, in one or two lines (logged at the start of every run): epochs,
    updates, lr at each milestone, warm-up; and how ``epochs`` rescaled the base regime.

    Example:
        >>> from bigbatch.recipes import Regime
        >>> r = Regime.from_dict({"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1},
        ...                                                {"epoch": 1, "lr": 0.01}]})
        >>> cfg = RunConfig(model="f1", dataset="synthetic", regime=r.to_dict())
        >>> schedule_lines(Plan(cfg, r, r, 1024, 8, 16, torch.device("cpu")))
        ... # doctest: +NORMALIZE_WHITESPACE
        ['schedule: 2 epochs, 16 updates of batch 128 (8 per epoch);
          lr 0.1 from epoch 0, 0.01 from epoch 1']
    """
    from bigbatch.recipes import Regime
    from bigbatch.train.config import base_regime_dict

    regime, config = plan.regime, plan.config
    lrs = ", ".join(f"{p['lr']:.4g} from epoch {p['epoch']:g}" for p in regime.phases if "lr" in p)
    def count(n: float, what: str) -> str:
        return f"{n:g} {what}" + ("" if n == 1 else "s")

    line = (f"schedule: {count(regime.epochs, 'epoch')}, {count(plan.num_updates, 'update')} of "
            f"batch {config.batch_size} ({plan.updates_per_epoch} per epoch); lr {lrs}")
    if regime.schedule != "step":
        line += f" ({regime.schedule})"
    if regime.warmup_epochs:
        line += f"; linear warm-up over {regime.warmup_epochs:g} epochs"
    lines = [line]
    written = Regime.from_dict(base_regime_dict(config)).epochs
    if config.epochs is not None and config.epochs != written:
        lines.append(f"  (--epochs {config.epochs:g} rescaled the {written:g}-epoch base regime: "
                     f"every milestone moved by x{config.epochs / written:.3g})")
    return lines


def _warn_questionable(config: RunConfig, plan: Plan, batch_sizes: set[int]) -> None:
    """One line for each setting that runs but is probably not what was meant."""
    if config.batch_size > plan.dataset_size:
        log.warning("batch_size=%d is larger than the training set: each epoch is one update "
                    "of all %d samples", config.batch_size, plan.dataset_size)
    ghost = config.ghost_batch_size
    for size in sorted(batch_sizes) if ghost else ():
        last = size % ghost
        # "Much smaller": under half a ghost batch, its statistics are over 2x noisier.
        if 0 < last < ghost / 2:
            log.warning("a batch of %d samples in ghost batches of %d leaves a last ghost batch of "
                        "%d (under half of %d): its batch statistics are much noisier; choose a "
                        "ghost size that divides %d", size, ghost, last, ghost, size)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def _check_batch_split(config: RunConfig, model: nn.Module, batch_sizes: set[int]) -> None:
    """Refuse a batch split that batch norm cannot use; warn of micro-batches with plain BN.

    ``batch_sizes`` are this process's batch sizes in an epoch (:func:`_shard_sizes`).
    """
    has_bn = _has_batchnorm(model)
    _check_normalisation_groups(config, batch_sizes, has_bn)
    if config.micro_batch_size and has_bn and config.ghost_batch_size is None:
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
