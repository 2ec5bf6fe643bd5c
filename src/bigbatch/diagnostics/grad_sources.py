"""Where a training loop gets the small-batch squared norm ``|g_s|^2`` for the noise scale.

The big batch's gradient is what the loop already has (``p.grad`` after the update's last
backward, see :func:`~bigbatch.diagnostics.squared_grad_norm`). A small-batch gradient beside it
comes for free in two set-ups:

- **micro-batches** (gradient accumulation): each micro-batch's own gradient. ``p.grad``
  accumulates, so :class:`MicroBatchGradNorms` reads each backward's gradient in a tensor hook on
  every parameter, before it is added to ``p.grad``: no copy of the gradients, one small
  reduction per parameter per backward.
- **DDP processes**: each process's local gradient before the all-reduce.
  :class:`DDPGradNorms` is a communication hook (``model.register_comm_hook``) that squares
  every bucket before the all-reduce and after it.

Both return tensors and never synchronise a GPU until asked for a float. A loop with ``k``
micro-batches of ``m`` examples per update (``B = k * m``)::

    norms, noise = MicroBatchGradNorms(model.parameters()), GradientNoiseScale(decay=0.99)
    for x, y in loader:
        optimizer.zero_grad()
        for i, (xs, ys) in enumerate(zip(x.split(m), y.split(m))):
            with no_sync_context(model, is_last_micro_batch=i == k - 1):
                (loss_fn(model(xs), ys) / k).backward()
            norms.end_micro_batch()
        small = norms.pop(grad_multiplier=k).mean()
        noise.update(small, m, squared_grad_norm(model.parameters()), B * world_size)
        optimizer.step()

Under DDP ``small`` is this process's; average it over the processes (one scalar all-reduce)
before the update, so that every process holds the same estimate. Without micro-batches, under
DDP, :meth:`DDPGradNorms.collect` gives both numbers (``B_s`` = the per-process batch, ``B_b`` =
the global one); with neither there is no small batch to compare, and no estimate.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["DDPGradNorms", "MicroBatchGradNorms"]


class MicroBatchGradNorms:
    """Squared norm of each micro-batch's own gradient during gradient accumulation.

    Registers a hook on every parameter that adds ``|grad|^2`` of the gradient this backward
    produces (before accumulation into ``p.grad``). Call :meth:`end_micro_batch` after each
    micro-batch's backward and :meth:`pop` once per update. A parameter used several times in one
    graph is fine (its hook sees the summed gradient); several backward passes per micro-batch
    (reentrant activation checkpointing) would each count separately, so do not use it there.

    The cost is one norm per parameter per backward (a few % of an update on a CPU, see
    ``benchmarks/RESULTS.md``); to pay it on some updates only, set :attr:`enabled` to False on the
    others (the hooks then return at once and :meth:`end_micro_batch` records nothing). The noise
    scale is an average anyway, so measuring every 4th update changes only how fast it settles.

    Args:
        parameters: the parameters to watch (those with ``requires_grad``).

    Attributes:
        enabled: record micro-batches (True) or skip them; may change between updates.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> norms = MicroBatchGradNorms([w])
        >>> for target in ([3.0, 4.0], [0.0, 1.0]):  # loss = -w . target: grad = -target
        ...     (-(w * torch.tensor(target)).sum()).backward(); norms.end_micro_batch()
        >>> norms.pop().tolist(), w.grad.tolist()  # per micro-batch, while .grad accumulated
        ([25.0, 1.0], [-3.0, -5.0])
        >>> norms.remove()
    """

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        import torch

        params = [p for p in parameters if p.requires_grad]
        if not params:
            raise ValueError("no parameter with requires_grad=True to watch")
        self._device = params[0].device
        self._dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) \
            else torch.float32
        self._norms: list[torch.Tensor] = []  # this micro-batch's, one per parameter
        self._done: list[torch.Tensor] = []
        self._handles = [p.register_hook(self._hook) for p in params]
        self.enabled = True

    def _hook(self, grad: torch.Tensor) -> None:
        import torch

        if not self.enabled:
            return

        # One reduction per parameter here; squaring and summing wait for end_micro_batch, where
        # they are one stacked op instead of three small ones per parameter.
        self._norms.append(torch.linalg.vector_norm(grad, dtype=self._dtype).to(self._device))

    def end_micro_batch(self) -> None:
        """Close the current micro-batch: its squared norm is kept for :meth:`pop`."""
        import torch

        if not self.enabled:
            return
        if self._norms:
            self._done.append(torch.stack(self._norms).square().sum())
        else:
            self._done.append(torch.zeros((), dtype=self._dtype, device=self._device))
        self._norms = []

    def pop(self, grad_multiplier: float | Sequence[float] = 1.0) -> torch.Tensor:
        """The squared norms of the micro-batches since the last call (1-d tensor), and reset.

        Micro-batches of unequal sizes ``b_i`` (a short last one) are fine: their mean squared
        norm is that of a batch of the harmonic mean ``1 / mean(1 / b_i)``; pass that as
        ``small_batch_size`` to :meth:`GradientNoiseScale.update`.

        Args:
            grad_multiplier: what each backward's gradient must be multiplied by to be that
                micro-batch's mean gradient: ``k`` when the loop divides each micro-batch loss by
                its ``k`` micro-batches (so ``p.grad`` ends as the mean), ``B / b_i`` when it
                weights micro-batch ``i`` by ``b_i / B``, and divided by the loss scale under AMP.
                One number for all, or one per micro-batch. The norms are multiplied by its square.

        Raises:
            ValueError: no micro-batch was closed since the last call, or the number of
                multipliers differs from the number of micro-batches.
        """
        import torch

        if not self._done:
            raise ValueError("no micro-batch to report: call end_micro_batch() after each "
                             "micro-batch's backward")
        norms = torch.stack(self._done)
        if isinstance(grad_multiplier, Sequence):
            if len(grad_multiplier) != len(self._done):
                raise ValueError(f"{len(grad_multiplier)} grad multipliers for "
                                 f"{len(self._done)} micro-batches: give one per micro-batch")
            factors = torch.tensor([float(m) ** 2 for m in grad_multiplier], dtype=norms.dtype)
            norms = norms * factors.to(norms.device)
        else:
            norms = norms * float(grad_multiplier) ** 2
        self._done = []
        return norms

    def remove(self) -> None:
        """Remove the hooks (the object is unusable afterwards)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class DDPGradNorms:
    """A DDP communication hook that records the local and the global squared gradient norms.

    The hook replaces DDP's default all-reduce with the same average (``buffer / world_size``,
    then ``all_reduce``), and on the way sums ``|bucket|^2`` before the reduction (this process's
    gradient over its own ``B_s`` examples, or its accumulated micro-batches under ``no_sync``) and
    after it (the global gradient over ``B_b = world_size * B_s``). Call :meth:`collect` after the
    update's synchronising backward, on every process.

    To measure some updates only, set :attr:`enabled` to False on the others (the same on every
    process): the hook then only averages, as DDP's default does, and records nothing.

    Args:
        model: the ``DistributedDataParallel`` model; the hook is registered on it (DDP takes one
            communication hook, so this replaces none other).

    Attributes:
        enabled: record the norms (True) or only average; may change between updates.

    Launch (two CPU processes)::

        torchrun --nproc-per-node 2 train.py   # with backend "gloo"
    """

    def __init__(self, model: DistributedDataParallel) -> None:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            raise ValueError(f"DDPGradNorms needs a DistributedDataParallel model, got "
                             f"{type(model).__name__}; without DDP use MicroBatchGradNorms")
        self._group = model.process_group
        self._world_size = dist.get_world_size(self._group)
        first = next(model.parameters())
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        self._local = torch.zeros((), dtype=dtype, device=first.device)
        self._global = torch.zeros((), dtype=dtype, device=first.device)
        self.enabled = True
        model.register_comm_hook(self, DDPGradNorms._hook)

    @staticmethod
    def _hook(state, bucket):  # no annotations: DDP rejects the strings of postponed ones
        import torch
        import torch.distributed as dist

        buffer = bucket.buffer()
        wide = torch.float64 if buffer.dtype == torch.float64 else torch.float32
        if state.enabled:
            state._local = state._local + torch.linalg.vector_norm(buffer, dtype=wide).square()
        buffer.div_(state._world_size)
        future = dist.all_reduce(buffer, group=state._group, async_op=True).get_future()
        if not state.enabled:
            return future.then(lambda fut: fut.value()[0])

        def record_global(fut: torch.futures.Future) -> torch.Tensor:
            reduced = fut.value()[0]
            state._global = state._global + torch.linalg.vector_norm(
                reduced, dtype=wide).square()
            return reduced

        return future.then(record_global)

    def collect(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean local |g_s|^2 over processes, global |g_b|^2)`` since the last call, and reset.

        Averages the local values over the processes with one scalar all-reduce, so every process
        gets the same numbers (an AdaScale gain that differed between processes would let their
        parameters drift apart). Must be called on every process.
        """
        import torch
        import torch.distributed as dist

        local = self._local.clone()
        dist.all_reduce(local, group=self._group)
        result = (local / self._world_size, self._global)
        self._local = torch.zeros_like(self._local)
        self._global = torch.zeros_like(self._global)
        return result
