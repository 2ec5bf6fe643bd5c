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

This module is the loop, over one :class:`~bigbatch.train.state.TrainState` (model, optimizer,
weight-distance origin, counters) that :mod:`bigbatch.train.rundir` saves and restores whole (with
the RNG states); the run directory (resume checks, config.toml, what a checkpoint and the summary
hold) is :mod:`bigbatch.train.rundir`, the metrics row of an evaluation
:mod:`bigbatch.train.evaluation`, and the set-up (loaders, plan, model, optimizer, checks)
:mod:`bigbatch.train.build`.

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

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from bigbatch import distributed
from bigbatch.errors import ConfigError
from bigbatch.train import divergence, noise, rundir
from bigbatch.train.build import (
    Run,
    build_model,
    build_run,
    check_process_split,
    schedule_lines,
)
from bigbatch.train.config import RunConfig, base_regime_dict
from bigbatch.train.evaluation import evaluate, evaluation_row
from bigbatch.train.metrics import MetricsLogger
from bigbatch.train.progress import Progress, resolve_progress_mode
from bigbatch.train.step import StepResult, forward_backward, grad_norm

__all__ = ["StepResult", "build_model", "evaluate", "forward_backward", "train"]  # re-exported

log = logging.getLogger("bigbatch.train")

_DIFFUSION_CSV_FIELDS = ["updates", "epoch", "lr", "weight_distance"]


# -- the run --------------------------------------------------------------------------------------
def train(
    config: RunConfig, run_dir: str | Path | None = None, *, resume: bool = False
) -> dict[str, Any]:
    """Train one run and write its outputs to ``run_dir``.

    Args:
        config: the run configuration.
        run_dir: output directory (created; default ``config.out``). Holds config.toml,
            metrics.csv/.jsonl, diffusion.csv/.jsonl, checkpoints/last.pt and best.pt,
            summary.json.
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
    if run_dir is None and config.out is None:
        raise ConfigError("no run directory: pass run_dir or set the config key out")
    run_dir = Path(run_dir if run_dir is not None else config.out)
    # torchrun --max-restarts restarts every worker after a failure: continue from last.pt (only a
    # run that this torchrun job started; prepare_run_dir checks the job id in the checkpoint).
    auto_resume = not resume and distributed.elastic_restart_count() > 0
    ctx = distributed.setup(config.device)
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if ctx.device.type == "cpu":
            # Bitwise reproducible on CPU (resume == uninterrupted); warn_only: never refuse an op.
            torch.use_deterministic_algorithms(True, warn_only=True)
        return _train(config, run_dir, ctx, resume=resume or auto_resume, auto_resume=auto_resume)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        distributed.teardown(ctx)


def _train(config: RunConfig, run_dir: Path, ctx: Any, *, resume: bool, auto_resume: bool):
    # The model's default regime is written out explicitly: config.toml alone rebuilds the run.
    config = config.replace(regime=base_regime_dict(config))
    check_process_split(config, ctx)  # before any file is touched
    checkpoint = rundir.prepare_run_dir(
        run_dir, config, resume=resume, auto_resume=auto_resume, ctx=ctx
    )
    extending = checkpoint is not None and rundir.is_extension(checkpoint["config"], config)
    if checkpoint is not None and not extending:
        done = distributed.broadcast_object(
            rundir.read_summary(run_dir) if ctx.is_main else {}, ctx
        )
        if done.get("status") == "complete":
            log.info("%s is already complete", run_dir)
            return done
    run = build_run(config, ctx, run_dir)
    meter = noise.attach(run)  # None unless --noise-scale; sets the estimator up before restore
    rundir.create_run_dir(run_dir, ctx)  # only now: a run that fails to build leaves nothing
    if ctx.is_main:
        for line in schedule_lines(run.plan):  # what --epochs made of the regime, before it runs
            log.info("%s", line)
    if extending and ctx.is_main:
        # The run is no longer complete: config.toml now holds the extended regime, so a plain
        # --resume continues the extension.
        (run_dir / "summary.json").unlink(missing_ok=True)
        rundir.write_config(run_dir, run.state, run.plan)
    if checkpoint is not None:
        rundir.restore(run.state, checkpoint, ctx)
        c = run.state.counters
        if ctx.is_main:
            rundir.truncate_outputs(run_dir, c.updates)
        log.info("resumed %s at update %d of %d", run_dir, c.updates, run.plan.num_updates)
    elif ctx.is_main:
        rundir.write_config(run_dir, run.state, run.plan)
    row = _loop(run, meter, resumed=checkpoint is not None)
    summary = rundir.summary(run_dir, run.state.counters, run.plan, row, is_main=ctx.is_main)
    if meter is not None:
        summary.update(meter.summary(run.plan.updates_per_epoch))
    if ctx.is_main:
        rundir.write_summary(run_dir, summary)
    return summary


class _Clock:
    """Wall time since the last checkpoint (folded into the counters when saving)."""

    def __init__(self) -> None:
        self.since_save = self.last_checkpoint = time.perf_counter()

    def wall_time(self, c: Any) -> float:
        return c.wall_time_s + (time.perf_counter() - self.since_save)


def _loop(run: Run, meter: noise.NoiseMeter | None, *, resumed: bool) -> dict[str, Any]:
    """Every update from ``counters.updates`` to the end; the last evaluation's row.

    The end is ``plan.num_updates``, or under AdaScale the update at which its progress reaches
    the small-batch run's number of updates (``meter.done``).
    """
    from bigbatch.diagnostics import log_spaced_updates

    plan, c, config, ctx = run.plan, run.state.counters, run.plan.config, run.ctx
    diffusion_at = set(log_spaced_updates(plan.num_updates)) if config.log_diffusion else set()
    ckpt_seconds = (config.checkpoint_every_minutes or math.inf) * 60
    eval_every = config.eval_every or plan.updates_per_epoch
    metrics = diffusion = None
    if ctx.is_main:
        purge = c.updates + 1 if resumed else None  # TensorBoard drops events written after it
        metrics = MetricsLogger(run.run_dir, "metrics", purge_step=purge)
        if config.log_diffusion:
            diffusion = MetricsLogger(
                run.run_dir, "diffusion", tensorboard=False, csv_fields=_DIFFUSION_CSV_FIELDS
            )
    progress = Progress(plan.num_updates, c.updates,
                        resolve_progress_mode(config.progress) if ctx.is_main else "none")
    clock, row = _Clock(), {}
    run.train_model.train()
    try:
        while c.updates < plan.num_updates and not (meter is not None and meter.done):
            epoch, step = divmod(c.updates, plan.updates_per_epoch)
            tick = time.perf_counter()
            for x, y in run.train_loader.iterate(epoch, start_step=step, shard=run.shard):
                # The loader knows the global batch's size: no collective needed to learn it.
                global_n = run.train_loader.batch_size_at(step)
                if run.state.adascale is not None:  # lr = gain x base lr at AdaScale's progress
                    settings = meter.settings(global_n)
                else:
                    settings = plan.regime.settings_at(epoch + step / plan.updates_per_epoch)
                loss, time_due = _update(run, meter, x, y, global_n, settings,
                                         checkpoint_at=clock.last_checkpoint + ckpt_seconds)
                step += 1
                # Time per update includes loading the batch; the host sync in _update has
                # already waited for the GPU.
                c.interval_train_time_s += time.perf_counter() - tick
                progress.update(1, loss=f"{loss:.3f}")
                done = c.updates >= plan.num_updates or (meter is not None and meter.done)
                eval_due = done or c.updates % eval_every == 0
                if c.updates in diffusion_at and not eval_due:
                    _log_diffusion(run, diffusion)  # evaluations log their own row
                if eval_due:
                    row = _evaluate(run, meter, metrics, diffusion, progress, clock)
                elif c.updates % plan.updates_per_epoch == 0 or time_due:
                    _save(run, clock, best=False)
                if done:
                    break
                tick = time.perf_counter()
    finally:
        progress.close()
        for writer in (metrics, diffusion):
            if writer is not None:
                writer.close()
    return row


def _update(run: Run, meter: noise.NoiseMeter | None, x: torch.Tensor, y: torch.Tensor,
            global_n: int, settings: dict, *, checkpoint_at: float) -> tuple[float, bool]:
    """One optimizer update on this process's slice ``x, y`` of a global batch of ``global_n``.

    On a measured update (``meter``: every ``noise_scale_every``-th) the squared norms of the
    small-batch and the big-batch gradients are taken before clipping and fed to the estimate.

    Returns the mean loss over the global batch, and whether a timed checkpoint is due: rank 0's
    clock (past ``checkpoint_at``) decides, for every process.
    """
    from bigbatch.recipes import apply_settings

    state, config, c = run.state, run.plan.config, run.state.counters
    apply_settings(state.optimizer, settings)
    if run.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    state.optimizer.zero_grad(set_to_none=True)
    # A skipped update must leave no trace: the forward pass has already moved the BN running
    # statistics, so keep a copy of the buffers (small) to put back.
    saved = [b.clone() for b in state.model.buffers()] if config.on_nonfinite == "skip" else None
    measuring = meter is not None and meter.begin(c.updates)
    result = forward_backward(run.train_model, x, y, global_batch_size=global_n,
                              micro_batch_size=config.micro_batch_size, autocast=run.autocast,
                              no_sync=run.no_sync(), world_size=run.ctx.world_size,
                              after_backward=meter.after_backward if measuring else None)
    norm = grad_norm(run.params, config.clip)  # before clipping; clips .grad if asked
    measured = meter.norms(global_n, norm) if measuring else None
    time_due = run.ctx.is_main and time.perf_counter() > checkpoint_at
    loss_sum, correct, time_due = _reduce_step(result, time_due, run.ctx)
    scalars = [loss_sum.float(), correct.float(), norm.float()]
    if measured is not None:  # |g_s|^2 and |g_b|^2 ride along (in float64 if they are)
        scalars += [measured[0], measured[2]]
    host = torch.stack([v.double().to(loss_sum.device) for v in scalars]).tolist()
    loss_sum, correct, norm = host[:3]  # the one host sync per update
    c.updates += 1
    c.samples += global_n
    if math.isfinite(loss_sum) and math.isfinite(norm):
        state.optimizer.step()
        if measured is not None:
            meter.record(host[3], measured[1], host[4], global_n)
        c.train_loss_sum += loss_sum
        c.train_correct += correct
        c.train_samples += global_n
    else:
        divergence.nonfinite_update(run, loss_sum, norm, settings)
        with torch.no_grad():
            for b, old in zip(state.model.buffers(), saved or [], strict=False):
                b.copy_(old)
    c.interval_samples += global_n
    return loss_sum / global_n, time_due


def _reduce_step(
    result: StepResult, time_due: bool, ctx: Any
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Sum the step's loss and hits over processes; ``time_due`` (rank 0's) rides along."""
    if not ctx.enabled:
        return result.loss_sum, result.correct, time_due
    flag = torch.tensor(float(time_due), device=result.loss_sum.device)
    summed = distributed.all_reduce_sum(
        torch.stack([result.loss_sum, result.correct.float(), flag]), ctx
    )
    return summed[0], summed[1], bool(summed[2].item())


def _log_diffusion(run: Run, writer: MetricsLogger | None) -> float:
    """``||w_t - w_0||`` now; its row (total and per parameter) goes to ``diffusion.csv``."""
    total, per_parameter = run.state.weight_distance(run.state.model)
    if writer is not None:
        updates = run.state.counters.updates
        writer.write({"updates": updates, "epoch": run.plan.epoch(updates),
                      "lr": run.state.lr(), "weight_distance": float(total),
                      "per_parameter": {k: float(v) for k, v in per_parameter.items()}})
    return float(total)


def _evaluate(run: Run, meter: noise.NoiseMeter | None, metrics: MetricsLogger | None,
              diffusion: MetricsLogger | None, progress: Progress,
              clock: _Clock) -> dict[str, Any]:  # fmt: skip
    """Evaluate, write the row, checkpoint (``best.pt`` too on a new best); returns the row.

    The row always has the noise-scale columns (``noise.NOISE_COLUMNS``, empty when off).
    """
    c = run.state.counters
    distance = _log_diffusion(run, diffusion)
    row = {**evaluation_row(run, weight_distance=distance, wall_time_s=clock.wall_time(c)),
           **noise.noise_columns(meter)}
    if metrics is not None:
        metrics.write(row)
    best = c.end_interval(row["val_error_pct"])
    progress.message(
        f"update {c.updates}/{run.plan.num_updates} (epoch {row['epoch']:.2f}): "
        f"train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
        f"val error {row['val_error_pct']:.2f}%, lr {row['lr']:.4g}, "
        f"|w-w0| {distance:.3f}, {row['samples_per_s']:.0f} train samples/s"
    )
    _save(run, clock, best=best)
    return row


def _save(run: Run, clock: _Clock, *, best: bool) -> None:
    """Checkpoint the state (every process calls this at the same update: it holds collectives)."""
    # The running statistics are averaged over processes so that the checkpoint does not hold
    # rank 0's alone.
    distributed.average_bn_running_stats(run.state.model, run.ctx)
    divergence.check_weights(run)  # never let NaN weights replace the last good checkpoint
    # Fold the time since the last save into the counter that the checkpoint carries.
    run.state.counters.wall_time_s = clock.wall_time(run.state.counters)
    clock.since_save = time.perf_counter()
    rundir.save(run.run_dir, run.state, run.plan, run.ctx, best=best)
    clock.last_checkpoint = time.perf_counter()
