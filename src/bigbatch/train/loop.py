"""The training engine: ``train(config, run_dir)``, one small loop you can read in one sitting.

What one run does, in order:

1. build the loaders, the model (ghost batch norm when ``ghost_batch_size`` is set), the optimizer;
2. for every global batch (one optimizer **update**): set lr/momentum/weight decay from the
   effective regime at the fractional epoch, run forward/backward (in micro-batches if asked,
   accumulating gradients), clip the gradient norm, check for NaN/Inf, step;
3. at every evaluation (each epoch, or every ``eval_every``): validation loss and
   top-1/top-5 error, the train averages since the last evaluation, the weight distance
   ||w_t - w_0||; one row to ``metrics.csv``/``.jsonl``, then ``checkpoints/last.pt`` (and
   ``best.pt``);
4. the weight distance also at log-spaced updates into ``diffusion.csv``/``.jsonl``;
5. ``summary.json`` with ``status = "complete"``.

This module is the loop; the run directory (resume checks, config.toml, what a checkpoint and
the summary hold) is :mod:`bigbatch.train.rundir`, evaluation :mod:`bigbatch.train.evaluation`,
and the model and the set-up checks :mod:`bigbatch.train.build`.

Resume (``train(config, run_dir, resume=True)``) restores the model, optimizer, weight-distance
origin, RNG states and counters from ``last.pt`` and continues mid-epoch: the loaders are
deterministic in ``(seed, epoch, step)``, so a resumed run writes the same metrics as an
uninterrupted one.

Example:
    >>> from bigbatch.train import RunConfig, train
    >>> cfg = RunConfig(model="f1", model_options={"hidden": 16, "depth": 2}, dataset="synthetic",
    ...                 batch_size=256, epochs=1, progress="none")
    >>> summary = train(cfg, tmp_run_dir)  # doctest: +SKIP
    >>> summary["status"]  # doctest: +SKIP
    'complete'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigbatch.errors import DivergenceError
from bigbatch.train import rundir
from bigbatch.train.build import _autocast, _check_batch_split, _uses_conv, build_model
from bigbatch.train.config import RunConfig, base_regime_dict, resolve_regime
from bigbatch.train.evaluation import _evaluation_sums, _val_row, evaluate
from bigbatch.train.metrics import MetricsLogger
from bigbatch.train.progress import Progress, resolve_progress_mode
from bigbatch.train.rundir import _Counters

__all__ = ["StepResult", "build_model", "evaluate", "forward_backward", "train"]

log = logging.getLogger("bigbatch.train")

_DIFFUSION_CSV_FIELDS = ["updates", "epoch", "lr", "weight_distance"]


@dataclasses.dataclass
class StepResult:
    """Sums over one global batch (this process's part of it under DDP)."""

    loss_sum: torch.Tensor  # sum of per-sample losses (detached)
    correct: torch.Tensor  # number of top-1 hits
    num_samples: int


# -- one step -------------------------------------------------------------------------------------
def forward_backward(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    global_batch_size: int | None = None,
    micro_batch_size: int | None = None,
    autocast: contextlib.AbstractContextManager | None = None,
    no_sync: Any = None,
    world_size: int = 1,
) -> StepResult:
    """Forward and backward over one batch, in micro-batches if asked; gradients are accumulated.

    The gradient left in ``.grad`` is that of the *mean* cross-entropy over the global batch: each
    micro-batch's summed loss is divided by ``global_batch_size``, i.e. its mean loss is weighted by
    micro size / batch size. With ghost batch norm and ``micro_batch_size`` a multiple of the ghost
    size, every ghost batch lies inside one micro-batch, so the result equals one pass up to float
    summation order (``tests/test_train_loop.py::test_micro_batches_match_one_pass``).

    Args:
        model: the model in training mode (gradients are *added* to ``.grad``: zero them first).
        x, y: the batch (this process's slice of it under DDP).
        global_batch_size: samples in the whole global batch (default ``len(x)``).
        micro_batch_size: chunk size; ``None`` or >= ``len(x)`` runs one pass.
        autocast: context for the forward pass (e.g. bf16 autocast); ``None`` = none.
        no_sync: ``callable(is_last) -> context`` that skips DDP's all-reduce on all but the last
            micro-batch; ``None`` = no DDP.
        world_size: processes whose gradients DDP *averages*; each summed loss is divided by
            ``global_batch_size / world_size`` so that the average is the gradient of the mean
            over the global batch (``distributed.loss_scale``).

    Returns:
        :class:`StepResult` with the detached loss sum and top-1 hits of this batch.
    """
    n = x.shape[0]
    # Single process: divide by the batch size itself (world_size=1 keeps the same rounding).
    total = (global_batch_size or n) / world_size
    chunks = (
        list(zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True))
        if micro_batch_size and micro_batch_size < n
        else [(x, y)]
    )
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    for i, (xm, ym) in enumerate(chunks):
        sync = no_sync(i == len(chunks) - 1) if no_sync is not None else contextlib.nullcontext()
        with sync:
            with autocast or contextlib.nullcontext():
                out = model(xm)
            loss = F.cross_entropy(out.float(), ym, reduction="sum")
            (loss / total).backward()
        loss_sum += loss.detach()
        correct += (out.detach().argmax(dim=1) == ym).sum()
    return StepResult(loss_sum, correct, n)


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """Global L2 norm of the gradients (before clipping); clips them in place to ``clip`` if set."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if clip is not None:
        return torch.nn.utils.clip_grad_norm_(grads, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))


# -- checks ---------------------------------------------------------------------------------------
def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- the run --------------------------------------------------------------------------------------
def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Train one run and write its outputs to ``run_dir``.

    Args:
        config: the run configuration.
        run_dir: output directory (created). Holds config.toml, metrics.csv/.jsonl,
            diffusion.csv/.jsonl, checkpoints/last.pt and best.pt, summary.json.
        resume: continue from ``run_dir/checkpoints/last.pt`` (a completed run returns its summary;
            a run with no checkpoint yet starts over).

    Under torchrun (``torchrun --nproc-per-node N -m bigbatch train ...``) every process calls this:
    ``config.batch_size`` is the global batch, split into contiguous slices of ``batch_size / N``
    (the loader's ``shard=(rank, N)``); DDP averages the gradients, micro-batches accumulate under
    ``no_sync``; ghost batch norm stays local to each process and the running statistics are
    averaged over processes before every evaluation and checkpoint; evaluation is sharded and its
    sums reduced; only rank 0 writes files. After a failure, ``torchrun --max-restarts`` restarts
    every process and they resume from ``last.pt`` (``TORCHELASTIC_RESTART_COUNT > 0``), if this
    torchrun job started the run. See ``bigbatch.distributed`` and the README.

    Returns:
        The summary dict (also written to ``summary.json``).

    Raises:
        ConfigError: invalid combination found at set-up (e.g. a 1-sample ghost batch), a run
            directory that already holds a run without ``resume``, or a resume with another config.
        DivergenceError: NaN/Inf loss or gradient norm with ``on_nonfinite="stop"``.
    """
    from bigbatch import distributed

    run_dir = Path(run_dir)
    # torchrun --max-restarts restarts every worker after a failure: continue from last.pt (only a
    # run that this torchrun job started; _prepare_run_dir checks the job id in the checkpoint).
    auto_resume = not resume and distributed.elastic_restart_count() > 0
    ctx = distributed.setup(config.device)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if ctx.device.type == "cpu":
            # Bitwise reproducible on CPU (resume == uninterrupted); warn_only: never refuse an op.
            torch.use_deterministic_algorithms(True, warn_only=True)
        return _Run(config, run_dir, ctx, resume or auto_resume, auto_resume).run()
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        distributed.teardown(ctx)


class _Run:
    """The state of one run; :meth:`run` is the loop. Split out of ``train`` for readability."""

    def __init__(
        self, config: RunConfig, run_dir: Path, ctx: Any, resume: bool, auto_resume: bool = False
    ):
        from bigbatch import data, distributed
        from bigbatch.diagnostics import WeightDistance, log_spaced_updates
        from bigbatch.recipes import build_optimizer

        self.dist = distributed
        self.ctx = ctx
        self.is_main = ctx.is_main
        self.device = device = ctx.device
        self.run_dir = run_dir
        # The model's default regime is written out explicitly: config.toml alone rebuilds the run.
        self.config = config = config.replace(regime=base_regime_dict(config))
        self.ckpt_dir = run_dir / rundir.CHECKPOINT_DIR
        # The global batch splits over the processes (checked before any file is touched).
        self.per_rank_batch = distributed.shard_batch_size(config.batch_size, ctx.world_size)
        if ctx.enabled:
            distributed.check_ghost_alignment(
                self.per_rank_batch, config.ghost_batch_size, exact=config.exact_ghost_alignment
            )
        self.start_state = self._prepare_run_dir(resume, auto_resume)

        torch.manual_seed(config.seed)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # Under torchrun with --download, one process per node fetches the files while the others
        # wait, so that no two processes write the same file.
        first_on_node = ctx.local_rank == 0
        if config.download and not first_on_node:
            distributed.barrier(ctx)
        self.train_loader, self.val_loader, self.info = data.build_loaders(
            config.dataset,
            data_dir=config.data_dir,
            batch_size=config.batch_size,
            eval_batch_size=config.eval_batch_size,
            device=device,
            seed=config.seed,
            train_subset=config.train_subset,
            held_out=config.held_out,
            download=config.download,
            num_workers=config.num_workers,
        )
        if config.download and first_on_node:
            distributed.barrier(ctx)
        self.dataset_size = int(self.train_loader.num_samples)
        self.updates_per_epoch = len(self.train_loader)
        self.base_regime, self.regime = resolve_regime(config, self.dataset_size)
        # As recipes.num_updates (halves round up), on the loader's own count of batches.
        exact = self.regime.epochs * self.updates_per_epoch
        self.num_updates = max(1, math.floor(exact + 0.5 + 1e-9 * max(1.0, exact)))

        model = build_model(config, self.info)
        # Batch sizes of an epoch (the last one is partial).
        sizes = {int(ix.numel()) for ix in self.train_loader.batch_indices(0)}
        _check_batch_split(config, model, sizes, ctx.world_size)
        self.channels_last = config.channels_last is True or (
            config.channels_last == "auto" and device.type == "cuda" and _uses_conv(model)
        )
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # the plain module: state_dict, weight distance
        # DDP broadcasts rank 0's weights when wrapping: w0 is taken after, the same on every rank.
        self.train_model = distributed.wrap_model(model, ctx)
        if ctx.world_size > 1:
            # From here each process draws its own random numbers (dropout masks), as one process
            # drawing for the whole global batch would; weights and data order are already shared.
            torch.manual_seed(distributed.rank_seed(config.seed, ctx.rank))
        self.weight_distance = WeightDistance(model)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = build_optimizer(model.parameters(), self.regime)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = _autocast(config, device)
        self.diffusion_updates = (
            set(log_spaced_updates(self.num_updates)) if config.log_diffusion else set()
        )
        self.counters = _Counters()
        self.started = time.perf_counter()

    # -- run directory, resume --------------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool, auto_resume: bool) -> dict | None:
        """The checkpoint to resume from, or ``None`` (see :func:`rundir.prepare_run_dir`)."""
        return rundir.prepare_run_dir(
            self.run_dir,
            self.config,
            resume=resume,
            auto_resume=auto_resume,
            dist=self.dist,
            ctx=self.ctx,
        )

    def _restore(self, state: dict) -> None:
        self.counters = rundir.restore_state(
            state,
            model=self.model,
            optimizer=self.optimizer,
            weight_distance=self.weight_distance,
            device=self.device,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        if self.is_main:
            rundir.truncate_outputs(self.run_dir, self.counters.updates)
        log.info(
            "resumed %s at update %d of %d", self.run_dir, self.counters.updates, self.num_updates
        )

    def _write_config(self) -> None:
        resolved = {
            "base_regime": self.base_regime.to_dict(),
            "effective_regime": self.regime.to_dict(),
            "dataset_size": self.dataset_size,
            "updates_per_epoch": self.updates_per_epoch,
            "num_updates": self.num_updates,
            "device": str(self.device),
            "world_size": self.ctx.world_size,
            "num_parameters": sum(p.numel() for p in self.model.parameters()),
        }
        rundir.write_config(self.run_dir, self.config, resolved)

    def _save(self, *, best: bool) -> None:
        # Every process calls this at the same update: the running statistics are averaged over
        # processes (a collective) so that the checkpoint does not hold rank 0's alone.
        self.dist.average_bn_running_stats(self.model, self.ctx)
        # Never let NaN weights replace the last good checkpoint.
        if not _finite_params(self.model):
            raise DivergenceError(
                f"the weights became NaN/Inf by update {self.counters.updates}; "
                f"{self.ckpt_dir / 'last.pt'} keeps the last good state. " + _DIVERGENCE_HINT
            )
        # Fold the time since the last save into the counter that the checkpoint carries.
        self.counters.wall_time_s = self._wall_time()
        self.started = time.perf_counter()
        # Every process's random-number state (a collective), so that a resume continues each
        # process's own dropout stream.
        rng_per_rank = self.dist.gather_objects(rundir.rng_state(self.device), self.ctx)
        if not self.is_main:
            return
        state = rundir.checkpoint_state(
            model=self.model,
            optimizer=self.optimizer,
            weight_distance=self.weight_distance,
            counters=self.counters,
            updates_per_epoch=self.updates_per_epoch,
            num_updates=self.num_updates,
            config=self.config,
            world_size=self.ctx.world_size,
            elastic_job_id=self.dist.elastic_job_id(),
            rng_per_rank=rng_per_rank,
        )
        rundir.write_checkpoint(self.run_dir, state, best=best)
        self.last_checkpoint_time = time.perf_counter()

    def _wall_time(self) -> float:
        return self.counters.wall_time_s + (time.perf_counter() - self.started)

    # -- metrics --------------------------------------------------------------------------------
    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _log_diffusion(self, writer: MetricsLogger | None) -> float:
        total, per_parameter = self.weight_distance(self.model)
        if writer is not None:
            writer.write(
                {
                    "updates": self.counters.updates,
                    "epoch": self.counters.updates / self.updates_per_epoch,
                    "lr": self._lr(),
                    "weight_distance": float(total),
                    "per_parameter": {k: float(v) for k, v in per_parameter.items()},
                }
            )
        return float(total)

    def _evaluate(
        self, metrics: MetricsLogger | None, diffusion: MetricsLogger | None, progress: Progress
    ) -> dict[str, Any]:
        c = self.counters
        # Ghost BN is local, so each process's running statistics come from its own slices:
        # evaluate (and save) their average over processes, the same model on every process.
        self.dist.average_bn_running_stats(self.model, self.ctx)
        # Sharded: each process evaluates its contiguous slice of every validation batch; the
        # sums (not the averages) are added up over processes in one collective.
        shard = (self.ctx.rank, self.ctx.world_size) if self.ctx.enabled else None
        val_sums = _evaluation_sums(
            self.train_model,
            self.val_loader.iterate(0, shard=shard),
            num_classes=self.info.num_classes,
            autocast=self.autocast,
            channels_last=self.channels_last,
        )
        sums = self.dist.reduce_metrics(
            {
                "loss": c.train_loss_sum,
                "correct": c.train_correct,
                "samples": c.train_samples,
                **val_sums,
            },
            self.ctx,
        )
        val = _val_row(sums, self.info.num_classes)
        seen = max(sums["samples"], 1)
        distance = self._log_diffusion(diffusion)
        row = {
            "updates": c.updates,
            "epoch": c.updates / self.updates_per_epoch,
            "samples": c.samples,
            "lr": self._lr(),
            "train_loss": sums["loss"] / seen if sums["samples"] else math.nan,
            "train_error_pct": 100.0 * (1 - sums["correct"] / seen)
            if sums["samples"]
            else math.nan,
            **val,
            "weight_distance": distance,
            "wall_time_s": self._wall_time(),
            "samples_per_s": c.interval_samples / c.interval_train_time_s
            if c.interval_train_time_s > 0
            else math.nan,
            "skipped_steps": c.skipped_steps,
        }
        if metrics is not None:
            metrics.write(row)
        c.train_loss_sum = c.train_correct = 0.0
        c.train_samples = c.interval_samples = 0
        c.interval_train_time_s = 0.0
        best = row["val_error_pct"] < c.best_val_error_pct
        c.best_val_error_pct = min(c.best_val_error_pct, row["val_error_pct"])
        progress.message(
            f"update {c.updates}/{self.num_updates} (epoch {row['epoch']:.2f}): "
            f"train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
            f"val error {row['val_error_pct']:.2f}%, lr {row['lr']:.4g}, "
            f"|w-w0| {distance:.3f}, {row['samples_per_s']:.0f} samples/s"
        )
        self._save(best=best)
        return row

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config, c = self.config, self.counters
        if self.start_state is not None:
            done = rundir.read_summary(self.run_dir) if self.is_main else {}
            done = self.dist.broadcast_object(done, self.ctx)
            if done.get("status") == "complete":
                log.info("%s is already complete", self.run_dir)
                return done
            self._restore(self.start_state)
            c = self.counters
        elif self.is_main:
            self._write_config()
        self.started = time.perf_counter()
        self.last_checkpoint_time = time.perf_counter()
        metrics = diffusion = None
        if self.is_main:
            purge = c.updates + 1 if self.start_state is not None else None
            metrics = MetricsLogger(self.run_dir, "metrics", purge_step=purge)
            if config.log_diffusion:
                diffusion = MetricsLogger(
                    self.run_dir, "diffusion", tensorboard=False, csv_fields=_DIFFUSION_CSV_FIELDS
                )
        mode = resolve_progress_mode(config.progress) if self.is_main else "none"
        progress = Progress(self.num_updates, c.updates, mode)
        upe = self.updates_per_epoch
        every = config.eval_every
        ckpt_seconds = (config.checkpoint_every_minutes or math.inf) * 60
        no_sync = (
            (lambda last: self.dist.no_sync_context(self.train_model, last))
            if self.ctx.enabled
            else None
        )
        row: dict[str, Any] = {}
        self.train_model.train()
        try:
            while c.updates < self.num_updates:
                epoch, step = divmod(c.updates, upe)
                shard = (self.ctx.rank, self.ctx.world_size) if self.ctx.enabled else None
                batches = self.train_loader.iterate(epoch, start_step=step, shard=shard)
                tick = time.perf_counter()
                for x, y in batches:
                    settings = self.regime.settings_at(epoch + step / upe)
                    self._apply(settings)
                    global_n = self._global_size(x.shape[0])
                    if self.channels_last and x.dim() == 4:
                        x = x.contiguous(memory_format=torch.channels_last)
                    self.optimizer.zero_grad(set_to_none=True)
                    # A skipped update must leave no trace: the forward pass has already moved the
                    # BN running statistics, so keep a copy of the buffers (small) to put back.
                    saved = (
                        [b.clone() for b in self.model.buffers()]
                        if config.on_nonfinite == "skip" else None
                    )
                    result = forward_backward(
                        self.train_model,
                        x,
                        y,
                        global_batch_size=global_n,
                        micro_batch_size=config.micro_batch_size,
                        autocast=self.autocast,
                        no_sync=no_sync,
                        world_size=self.ctx.world_size,
                    )
                    grad_norm = _grad_norm(self.params, config.clip)
                    # Rank 0's clock decides a timed checkpoint (a collective: all must agree).
                    time_due = (
                        self.is_main
                        and time.perf_counter() - self.last_checkpoint_time > ckpt_seconds
                    )
                    loss_sum, correct, time_due = self._reduce_step(result, time_due)
                    loss_sum, correct, norm = torch.stack(
                        [loss_sum.float(), correct.float(), grad_norm.float().to(loss_sum.device)]
                    ).tolist()  # the one host sync per update
                    c.updates += 1
                    step += 1
                    c.samples += global_n
                    if math.isfinite(loss_sum) and math.isfinite(norm):
                        self.optimizer.step()
                        c.train_loss_sum += loss_sum
                        c.train_correct += correct
                        c.train_samples += global_n
                    else:
                        self._nonfinite(loss_sum, norm, settings)
                        with torch.no_grad():
                            for b, old in zip(self.model.buffers(), saved or [], strict=False):
                                b.copy_(old)
                    c.interval_samples += global_n
                    # Time per update includes loading the batch; the host sync above has
                    # already waited for the GPU.
                    now = time.perf_counter()
                    c.interval_train_time_s += now - tick
                    progress.update(1, loss=f"{loss_sum / global_n:.3f}")

                    done = c.updates >= self.num_updates
                    eval_due = done or c.updates % (every or upe) == 0
                    if c.updates in self.diffusion_updates and not eval_due:
                        self._log_diffusion(diffusion)  # evaluations log their own row
                    if eval_due:
                        row = self._evaluate(metrics, diffusion, progress)
                    elif c.updates % upe == 0 or time_due:
                        self._save(best=False)
                    if done:
                        break
                    tick = time.perf_counter()
        finally:
            progress.close()
            for writer in (metrics, diffusion):
                if writer is not None:
                    writer.close()
        summary = self._summary(row)
        if self.is_main:
            rundir.write_summary(self.run_dir, summary)
        return summary

    def _apply(self, settings: dict[str, Any]) -> None:
        from bigbatch.recipes import apply_settings

        apply_settings(self.optimizer, settings)

    def _global_size(self, n: int) -> int:
        if not self.ctx.enabled:
            return n
        return int(self.dist.all_reduce_sum(float(n), self.ctx))

    def _reduce_step(
        self, result: StepResult, time_due: bool
    ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Sum the step's loss and hits over processes; ``time_due`` (rank 0's) rides along."""
        if not self.ctx.enabled:
            return result.loss_sum, result.correct, time_due
        flag = torch.tensor(float(time_due), device=result.loss_sum.device)
        summed = self.dist.all_reduce_sum(
            torch.stack([result.loss_sum, result.correct.float(), flag]), self.ctx
        )
        return summed[0], summed[1], bool(summed[2].item())

    def _nonfinite(self, loss_sum: float, norm: float, settings: dict[str, Any]) -> None:
        c = self.counters
        epoch = c.updates / self.updates_per_epoch
        lr = settings.get("lr", self._lr())
        where = f"update {c.updates} of {self.num_updates} (epoch {epoch:.2f}, lr {lr:.4g})"
        what = f"loss sum {loss_sum} and gradient norm {norm}"
        if self.config.on_nonfinite == "stop":
            self._write_failed_summary(f"non-finite {what} at {where}")
            last = self.ckpt_dir / "last.pt"
            kept = f"{last} keeps the last good state" if last.exists() else "no checkpoint yet"
            raise DivergenceError(
                f"training diverged at {where}: {what} ({kept}). " + _DIVERGENCE_HINT
            )
        c.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        log.warning("skipped %s: %s (%d skipped so far)", where, what, c.skipped_steps)

    def _write_failed_summary(self, message: str) -> None:
        if self.is_main:
            rundir.write_failed_summary(
                self.run_dir, self.config, self.counters.updates, message
            )

    def _summary(self, row: dict[str, Any]) -> dict[str, Any]:
        return rundir.summary(
            run_dir=self.run_dir,
            config=self.config,
            counters=self.counters,
            epochs=self.regime.epochs,
            row=row,
            device=self.device,
            world_size=self.ctx.world_size,
            is_main=self.is_main,
        )


_DIVERGENCE_HINT = (
    "The learning rate is probably too high for this batch size: try a linear warm-up "
    "(--warmup-epochs), a gentler --lr-scaling (sqrt instead of linear, or none), gradient "
    "clipping (--clip), or --on-nonfinite skip to skip such updates."
)

