"""Multi-GPU and multi-node training with torchrun and DistributedDataParallel (DDP).

Every piece of distributed code in bigbatch lives here; the training loop calls these functions and
works unchanged in a single process, where each of them is a no-op (or the identity).

How it maps onto the paper (Hoffer et al. 2017): the *global* batch ``batch_size`` is what the
recipes (learning-rate scaling, regime adaptation) see. Each of the ``world_size`` processes gets a
contiguous slice of ``batch_size / world_size`` samples; DDP averages the gradients, so one update
equals one update of single-process training on the whole global batch. Ghost batch norm stays
**local**: each process splits its own slice into ghost batches and normalises them alone, with no
communication in the forward pass (the opposite of :class:`torch.nn.SyncBatchNorm`). When
``ghost_batch_size`` divides the per-process batch, the ghost batches are exactly those of
single-process training, so the trained weights are the same
(``tests/test_distributed.py::test_ddp_matches_single_process``).

Launch with ``torchrun``, which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT;
:func:`setup` reads them, as nanoGPT does. One machine with 4 GPUs (``--batch-size`` is the global
batch, 1024 per GPU here)::

    torchrun --standalone --nproc-per-node 4 -m bigbatch train --model resnet44 \\
        --dataset cifar10 --batch-size 4096 --ghost-batch-size 128 --out runs/r44

Several machines and SLURM: see the README's "Multi-GPU / multi-node" section.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from bigbatch.errors import ConfigError
from bigbatch.machine import resolve_device

__all__ = [
    "all_reduce_sum", "average_bn_running_stats", "barrier", "broadcast_object", "DistContext",
    "elastic_job_id", "elastic_restart_count", "gather_objects", "launcher_rank",
    "no_sync_context", "rank_seed", "reduce_metrics", "setup", "teardown", "under_torchrun",
    "unwrap", "wrap_model"
]  # fmt: skip

# torchrun sets all of these; RANK alone decides whether we run under it (as in nanoGPT).
_TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: its rank, the number of processes and its device.

    A disabled context (``enabled=False``, rank 0 of 1) describes ordinary single-process training;
    every function of this module accepts it and then communicates nothing.

    Attributes:
        rank: global rank of this process, ``0 <= rank < world_size``.
        local_rank: rank on this node; selects the GPU (``cuda:local_rank``).
        world_size: number of processes in the job.
        backend: ``"nccl"`` (CUDA), ``"gloo"`` (CPU) or ``None`` when disabled.
        device: the device this process trains on.
        enabled: whether a process group was initialised by :func:`setup`.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files and logs."""
        return self.rank == 0


def _resolve_device(device: str | torch.device, local_rank: int, distributed: bool) -> torch.device:
    requested = resolve_device(device)
    if requested.type != "cuda":
        return requested
    if not torch.cuda.is_available():
        raise ConfigError(f"device={str(device)!r} but CUDA is not available; use --device cpu")
    if not distributed:
        return requested
    # torchrun gives each process one GPU by LOCAL_RANK; an explicit index would stack ranks on one.
    if requested.index is not None and requested.index != local_rank:
        raise ConfigError(
            f"device={str(device)!r} under torchrun: each process uses cuda:LOCAL_RANK "
            f"(cuda:{local_rank} here); pass --device cuda or auto and choose GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "start at most one process per GPU (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def setup(device: str | torch.device = "auto") -> DistContext:
    """Join the torchrun job this process belongs to, or describe a single process outside torchrun.

    Under torchrun (``RANK`` is set) this initialises the default process group from the
    environment: NCCL on CUDA, after ``torch.cuda.set_device(local_rank)`` so that each process owns
    one GPU, and gloo on CPU. Outside torchrun nothing is initialised and a disabled context is
    returned.

    Args:
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or any torch device
            string. Under torchrun a CUDA device always means ``cuda:LOCAL_RANK``.

    Returns:
        The :class:`DistContext` of this process; train on ``ctx.device``.

    Raises:
        ConfigError: some torchrun variables are missing or invalid, CUDA was requested but is not
            available, or there are fewer GPUs than processes on this node.

    Example:
        >>> ctx = setup("cpu")  # not under torchrun
        >>> ctx.enabled, ctx.rank, ctx.world_size, ctx.is_main
        (False, 0, 1, True)
    """
    if "RANK" not in os.environ:
        return DistContext(device=_resolve_device(device, 0, distributed=False))
    missing = [name for name in _TORCHRUN_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; "
            "launch with torchrun (python -m torch.distributed.run), which sets them all"
        )
    try:
        rank, local_rank, world_size = (int(os.environ[k]) for k in _TORCHRUN_VARS[:3])
    except ValueError as error:
        raise ConfigError(f"invalid torchrun environment variable: {error}") from None
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} must be in [0, WORLD_SIZE={world_size})")
    resolved = _resolve_device(device, local_rank, distributed=True)
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank, local_rank, world_size, backend, resolved, enabled=True)


def under_torchrun() -> bool:
    """Whether torchrun started this process (``RANK`` is set); usable before :func:`setup`."""
    return "RANK" in os.environ


def launcher_rank() -> int:
    """This process's global rank as torchrun set it (0 outside torchrun), before :func:`setup`.

    The CLI uses it to configure logging (only rank 0 logs at INFO) before any process group exists.
    An unparsable ``RANK`` counts as 0 here; :func:`setup` reports it.
    """
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this job's workers (``--max-restarts``); 0 outside it.

    torchrun's elastic agent restarts *all* workers after any of them fails, with
    ``TORCHELASTIC_RESTART_COUNT`` counting the restarts; ``bigbatch.train`` then resumes from the
    last checkpoint (see :func:`elastic_job_id`).
    """
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def elastic_job_id() -> str | None:
    """An identifier of this torchrun job that stays the same across its elastic restarts.

    It is the rendezvous id (``--rdzv-id``; ``--standalone`` draws a random one) when there is one.
    torchrun's default static rendezvous calls every job ``"none"``; then the torchrun agent that
    started this process (host and process id), which lives for the whole job, identifies it.
    ``None`` outside torchrun. Checkpoints record it so that an elastic restart resumes only a run
    that this job started, never an older run that happened to be in the same directory.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    run_id = os.environ["TORCHELASTIC_RUN_ID"]
    if run_id and run_id != "none":
        return run_id
    return f"{socket.gethostname()}:{os.getppid()}"


# How long teardown hands the GIL to gloo's worker threads before the process group can be freed.
_GLOO_DRAIN_S = 0.2


def teardown(ctx: DistContext) -> None:
    """Destroy the process group that :func:`setup` created (no-op when disabled).

    Under gloo it first sleeps :data:`_GLOO_DRAIN_S`, releasing the GIL: a gloo thread frees a
    finished collective's tensors (which takes the GIL) after ``wait()`` has returned, and
    ``~ProcessGroupGloo`` joins it with the GIL held when DDP's ``Reducer`` is the group's last
    owner (kept alive, say, by the traceback of an exception raised right after a collective): a
    deadlock (pytorch/pytorch#56297). The pause lets every pending free finish first.
    """
    if ctx.enabled and dist.is_initialized():
        if dist.get_backend() == "gloo" and _GLOO_DRAIN_S > 0:
            time.sleep(_GLOO_DRAIN_S)
        dist.destroy_process_group()


# -- The model ------------------------------------------------------------------------------------
def _ddp_options() -> dict[str, bool]:
    # Rank-local buffers: BN running stats are not broadcast from rank 0 before every forward
    # (costly and it would discard the other ranks' statistics); average_bn_running_stats merges
    # them instead. torch >= 2.13 spells this forward_sync_buffers (broadcast_buffers warns there).
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def wrap_model(model: nn.Module, ctx: DistContext, **ddp_options: Any) -> nn.Module:
    """Wrap ``model`` (already on ``ctx.device``) in DDP; return it unchanged when disabled.

    DDP broadcasts rank 0's parameters and buffers at construction, so every process starts from the
    same weights. Build the optimizer after wrapping, on the wrapped model's parameters (the same
    tensors).

    Args:
        model: the model, on ``ctx.device``; convert BN to ghost BN *before* wrapping.
        ctx: from :func:`setup`.
        **ddp_options: extra :class:`~torch.nn.parallel.DistributedDataParallel` arguments.

    Returns:
        The DDP-wrapped model, or ``model`` itself when ``ctx`` is disabled.

    Raises:
        ValueError: the model's parameters are not on ``ctx.device``.
    """
    if not ctx.enabled:
        return model
    devices = {p.device for p in model.parameters()}
    if devices != {ctx.device}:
        raise ValueError(
            f"model parameters are on {sorted(map(str, devices))}, not {ctx.device}; "
            "call model.to(ctx.device) before wrap_model"
        )
    options = {**_ddp_options(), **ddp_options}
    if "broadcast_buffers" in options and not options["broadcast_buffers"]:
        # Older torch skips the initial buffer broadcast with broadcast_buffers=False; do it here.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **options)


def _unwrap_once(model: nn.Module) -> nn.Module | None:
    if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
        return model.module
    # torch.compile returns an OptimizedModule that keeps the original in _orig_mod.
    return getattr(model, "_orig_mod", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP, ``nn.DataParallel`` and ``torch.compile`` wrappers (for
    state_dict and evaluation), found by type: not by stripping a ``module.`` prefix from names,
    which would break a model that owns a submodule called ``module``."""
    while (inner := _unwrap_once(model)) is not None:
        model = inner
    return model


def _find_ddp(model: nn.Module) -> DistributedDataParallel | None:
    while not isinstance(model, DistributedDataParallel):
        inner = _unwrap_once(model)
        if inner is None:
            return None
        model = inner
    return model


def no_sync_context(
    model: nn.Module, is_last_micro_batch: bool
) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an update.

    With gradient accumulation, gradients only need to be averaged once per update: inside
    ``model.no_sync()`` DDP accumulates locally, and the backward pass of the last micro-batch
    reduces the accumulated sum. Without DDP this is a null context.

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> with no_sync_context(m, is_last_micro_batch=False):
        ...     m(torch.ones(1, 2)).sum().backward()
    """
    ddp = _find_ddp(model)
    if ddp is None or is_last_micro_batch:
        return contextlib.nullcontext()
    return ddp.no_sync()


def _running_stat_buffers(model: nn.Module) -> Iterator[torch.Tensor]:
    for module in unwrap(model).modules():
        if isinstance(module, _BatchNorm) and module.running_mean is not None:
            yield module.running_mean
            yield module.running_var


@torch.no_grad()
def average_bn_running_stats(model: nn.Module, ctx: DistContext) -> None:
    """Replace every BN layer's running mean and variance by their average over processes, in place.

    Call it before each evaluation and checkpoint. Why: ghost BN (like plain BN under DDP here) is
    local; each process normalises its own ghost batches, with no cross-process statistics and no
    communication in the forward pass (unlike SyncBatchNorm). Each process's running statistics are
    therefore an exponential moving average over its own slices only, and they differ between ranks.
    Single-process running statistics are such an average over all ghost batches; since the moving
    average is linear, the mean over ranks is the same kind of estimate over every process's data,
    whereas saving rank 0's would use a ``1/world_size`` share of the data. Variances are averaged
    like means for the same reason: each is a moving average of per-ghost-batch variances.

    Covers every subclass of ``torch.nn.modules.batchnorm._BatchNorm`` (so ghost BN and
    SyncBatchNorm) that tracks running stats. ``num_batches_tracked`` is left alone: it counts
    updates, which are the same on every rank.
    """
    if not ctx.enabled:
        return
    buffers = list(_running_stat_buffers(model))
    if not buffers:
        return
    # One collective for all layers, in float64 so that averaging adds no rounding of its own.
    flat = torch.cat([b.reshape(-1).to(ctx.device, torch.float64) for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    for buffer, part in zip(buffers, flat.split([b.numel() for b in buffers]), strict=True):
        buffer.copy_(part.view_as(buffer))


# -- Collectives for sharded evaluation and coordination ------------------------------------------
def all_reduce_sum(
    values: torch.Tensor | float | Sequence[float], ctx: DistContext
) -> torch.Tensor | float | list[float]:
    """Sum ``values`` over all processes; the input is not modified.

    Args:
        values: a tensor, a number or a sequence of numbers (summed element-wise).
        ctx: from :func:`setup`.

    Returns:
        The same kind as the input: a new tensor (on the input's device), a float or a list of
        floats. Numbers are summed in float64, which is exact for counts below 2**53.

    Example:
        >>> all_reduce_sum([1.5, 2.0], DistContext())
        [1.5, 2.0]
    """
    if isinstance(values, torch.Tensor):
        if not ctx.enabled:
            return values.clone()
        summed = values.detach().to(ctx.device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(values.device)
    scalar = isinstance(values, (int, float))
    numbers = torch.tensor([values] if scalar else list(values), dtype=torch.float64)
    summed = all_reduce_sum(numbers, ctx).tolist()
    return summed[0] if scalar else summed


def reduce_metrics(sums: Mapping[str, float | int | torch.Tensor], ctx: DistContext) -> dict:
    """Sum a dict of per-process totals (loss sums, correct and sample counts) over processes.

    Every process must pass the same keys. One collective carries all values.

    Returns:
        A new dict with the same keys; ints stay ints, everything else becomes a float.

    Example:
        >>> reduce_metrics({"loss_sum": 3.5, "correct": 7, "samples": 10}, DistContext())
        {'loss_sum': 3.5, 'correct': 7, 'samples': 10}
    """
    keys = sorted(sums)  # the same order on every rank, whatever order the dict was built in
    numbers = [float(sums[k]) for k in keys]  # float() also takes one-element tensors
    totals = dict(zip(keys, all_reduce_sum(numbers, ctx), strict=True))
    return {k: round(totals[k]) if isinstance(sums[k], int) else totals[k] for k in sums}


def barrier(ctx: DistContext) -> None:
    """Wait until every process gets here (no-op when disabled)."""
    if not ctx.enabled:
        return
    if ctx.backend == "nccl":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def gather_objects(obj: T, ctx: DistContext) -> list[T]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` when disabled).

    Example:
        >>> gather_objects("rank 0's", DistContext())
        ["rank 0's"]
    """
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank`` for its own random draws (dropout): distinct per rank.

    Model initialisation and the data order use ``seed`` on every process (DDP also broadcasts rank
    0's weights); what each process draws for its own samples must differ, as one process drawing
    for the whole global batch would. A 63-bit hash of ``(seed, rank)``.

    Example:
        >>> rank_seed(0, 0) == rank_seed(0, 0) != rank_seed(0, 1)
        True
    """
    digest = hashlib.sha256(f"bigbatch rank seed {seed} {rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def broadcast_object(obj: T, ctx: DistContext, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every process (any picklable object; others' are ignored).

    Example:
        >>> broadcast_object({"run_dir": "runs/a"}, DistContext())
        {'run_dir': 'runs/a'}
    """
    if not ctx.enabled:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, device=ctx.device)
    return holder[0]
