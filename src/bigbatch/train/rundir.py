"""The run directory: prepare or resume it, write config.toml, checkpoint state and summary.json.

A run directory holds ``config.toml`` (the resolved config: rebuilds the run alone),
``metrics.csv``/``.jsonl``, ``diffusion.csv``/``.jsonl``, ``checkpoints/last.pt`` and ``best.pt``,
and ``summary.json``. Only rank 0 reads or writes it; under DDP the other processes get rank 0's
verdict (:func:`prepare_run_dir`). The training loop (``bigbatch.train.loop``) decides *when* to
save; this module decides *what* a checkpoint and a summary hold.

Example:
    >>> fixed_keys(["progress", "batch_size"])
    ['batch_size']
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bigbatch
from bigbatch import distributed
from bigbatch.errors import BigBatchError, ConfigError
from bigbatch.fileio import atomic_write_json, atomic_write_text, read_summary
from bigbatch.layers import backend_summary
from bigbatch.machine import cpu_name
from bigbatch.train.checkpoint import checkpoint_bytes, load_checkpoint, save_checkpoint
from bigbatch.train.config import RESOLVED_KEY, RESUME_FREE_KEYS, RunConfig, base_regime
from bigbatch.train.metrics import read_rows, truncate_rows
from bigbatch.train.state import Counters, Plan, TrainState

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "create_run_dir",
    "extend_config",
    "RESUME_FREE_KEYS",
    "fixed_keys",
    "is_extension",
    "prepare_run_dir",
    "read_summary",
    "restore",
    "save",
    "summary",
    "write_config",
    "write_failed_summary",
    "write_summary",
]

log = logging.getLogger("bigbatch.train")

CHECKPOINT_FORMAT = "bigbatch-checkpoint-v1"
CHECKPOINT_DIR = "checkpoints"
_OUTPUTS = [f"{name}{suffix}" for name in ("metrics", "diffusion") for suffix in (".csv", ".jsonl")]


# -- prepare, resume ------------------------------------------------------------------------------
def prepare_run_dir(
    run_dir: Path, config: RunConfig, *, resume: bool, auto_resume: bool, ctx: Any
) -> dict | None:
    """Rank 0 checks the run directory and loads the checkpoint; every process gets its verdict.

    Under DDP the other processes never read the directory themselves: they could see it in
    another state (rank 0 creating it) or not at all (a node-local disk), and every process
    must resume from the same checkpoint or fail with the same error.

    Returns:
        The checkpoint to resume from, or ``None`` to start from the beginning.
    """
    return _on_main(lambda: _prepare_run_dir_main(run_dir, config, resume, auto_resume), ctx)


def create_run_dir(run_dir: Path, ctx: Any) -> None:
    """Create ``run_dir/checkpoints`` and check that it is writable (rank 0; every process gets
    the verdict). Called once the run is built: a run that fails validation leaves no directory.

    Raises:
        ConfigError: the directory cannot be created or written.
    """
    _on_main(lambda: _create_run_dir_main(run_dir), ctx)


def _create_run_dir_main(run_dir: Path) -> None:
    try:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".bigbatch-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write to run directory {str(run_dir)!r}: {e.strerror or e}"
        ) from None


def _on_main(fn: Callable[[], Any], ctx: Any) -> Any:
    """``fn()`` on rank 0, its result (or its ``BigBatchError``, raised) on every process."""
    outcome: Any = None
    if ctx.is_main:
        try:
            outcome = fn()
        except BigBatchError as error:
            outcome = error
    outcome = distributed.broadcast_object(outcome, ctx)
    if isinstance(outcome, BigBatchError):
        raise outcome
    return outcome


def _prepare_run_dir_main(
    run_dir: Path, config: RunConfig, resume: bool, auto_resume: bool
) -> dict | None:
    ckpt_dir = run_dir / CHECKPOINT_DIR
    last = ckpt_dir / "last.pt"
    if not resume:
        if last.exists() or (run_dir / "metrics.csv").exists():
            raise ConfigError(
                f"run directory {str(run_dir)!r} already holds a run; continue it with "
                f"`bigbatch train --resume {run_dir}` or choose another --out"
            )
    elif last.exists():
        state = load_checkpoint(last, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{last} is not a {CHECKPOINT_FORMAT} checkpoint")
        job = distributed.elastic_job_id()
        if auto_resume and state.get("elastic_job_id") != job:
            raise ConfigError(
                f"torchrun restarted this job (TORCHELASTIC_RESTART_COUNT > 0) but "
                f"{str(run_dir)!r} holds a run that this job did not start; continue "
                f"it with `bigbatch train --resume {run_dir}` or choose another --out"
            )
        saved = RunConfig.from_dict(state["config"]).to_dict()
        now = config.to_dict()
        changed = fixed_keys(k for k in now if saved.get(k) != now[k])
        if changed and not is_extension(state["config"], config):
            k = changed[0]
            raise ConfigError(
                f"cannot resume {str(run_dir)!r} with a different config: {k} was "
                f"{saved.get(k)!r}, now {now[k]!r} (resume reads RUN_DIR/config.toml; start a "
                "new run to change it)"
            )
        return state
    else:
        log.info("no checkpoint in %s yet: starting the run from the beginning", run_dir)
        for name in _OUTPUTS:
            (run_dir / name).unlink(missing_ok=True)
    return None


def extend_config(config: RunConfig, epochs: float) -> RunConfig:
    """The config of ``config``'s run extended to ``epochs`` (base) epochs: ``--resume --epochs``.

    The extension continues the schedule's **last phase**: every milestone (and the warm-up)
    stays at the epoch where the run had it, and the last phase's settings (lr, momentum, weight
    decay) run on to the new end, so the updates already made are those of the extended run.
    ``epochs`` counts base-regime epochs, as ``--epochs`` does for a new run: with regime
    adaptation the run trains ``epochs`` x the adaptation factor. The base regime is written out
    with the new length (``epochs`` unset), so config.toml rebuilds the extended run alone.

    Raises:
        ConfigError: ``epochs`` not beyond the run's own, or a schedule whose lr depends on its
            length (``cosine``): extending it would change the lr of updates already made.

    Example:
        >>> cfg = RunConfig(model="f1", dataset="synthetic", epochs=2)
        >>> extend_config(cfg, 3).regime["epochs"], extend_config(cfg, 3).epochs
        (3.0, None)
    """
    base = base_regime(config)
    if not epochs > base.epochs:
        raise ConfigError(f"--epochs {epochs:g} on --resume extends a run: it must exceed the "
                          f"run's {base.epochs:g} base epochs")
    if base.schedule != "step":
        raise ConfigError(f"a {base.schedule!r} schedule depends on its length, so extending it "
                          "would change the lr of updates already made; start a new run from its "
                          "weights instead (--init-from RUN_DIR/checkpoints/last.pt)")
    return config.replace(regime={**base.to_dict(), "epochs": float(epochs)}, epochs=None)


def is_extension(saved: dict[str, Any], config: RunConfig) -> bool:
    """Whether ``config`` is the run of config dict ``saved`` extended (:func:`extend_config`):
    the same in every fixed key but the regime's length, which is longer."""
    old, now = RunConfig.from_dict(saved), config.to_dict()
    if fixed_keys(k for k, v in old.to_dict().items()
                  if k not in ("regime", "epochs") and now.get(k) != v):
        return False
    try:
        before, after = base_regime(old), base_regime(config)
    except ConfigError:
        return False
    same_phases = dataclasses.replace(after, epochs=before.epochs) == before
    return after.epochs > before.epochs and same_phases


def restore(state: TrainState, checkpoint: dict, ctx: Any) -> None:
    """Put a checkpoint back into ``state``: model, optimizer, weight-distance origin, counters and
    this process's random-number state.

    Each process gets back its own random-number state when the checkpoint has one per process
    for this world size; a job resumed on another number of processes (or from a checkpoint
    without them) reseeds each process from ``(seed, rank, updates)`` instead: deterministic, but
    not the stream the interrupted job would have drawn.
    """
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.weight_distance.load_state_dict(checkpoint["weight_distance"])
    state.load_extra_state_dict(checkpoint)  # the noise-scale averages, AdaScale's progress
    per_rank = checkpoint.get("rng_per_rank") or []
    if ctx.world_size == 1:
        _set_rng_state(checkpoint["rng"], ctx.device)
    elif len(per_rank) == ctx.world_size:
        _set_rng_state(per_rank[ctx.rank], ctx.device)
    else:
        seed = distributed.rank_seed(int(checkpoint["config"].get("seed", 0)), ctx.rank)
        torch.manual_seed((seed + checkpoint["updates"]) & (2**63 - 1))
    state.counters = Counters(**checkpoint["counters"])
    if "train_time_s" not in checkpoint["counters"]:  # bigbatch < 0.2 did not time training
        state.counters.untimed_samples = state.counters.samples


def truncate_outputs(run_dir: Path, updates: int) -> None:
    """Drop the metrics/diffusion rows written after ``updates`` (a resume writes them again)."""
    for name in _OUTPUTS:
        truncate_rows(run_dir / name, updates)


def fixed_keys(names: Any) -> list[str]:
    """The names (sorted) of config keys that cannot change on resume (not in
    ``RESUME_FREE_KEYS``, which :mod:`bigbatch.train.config` builds from the keys' declarations).

    Example:
        >>> fixed_keys(["device", "batch_size", "seed"])
        ['batch_size', 'seed']
    """
    return sorted(k for k in names if k not in RESUME_FREE_KEYS)


# -- writing --------------------------------------------------------------------------------------
def write_config(run_dir: Path, state: TrainState, plan: Plan) -> None:
    """``config.toml``: the config plus what was resolved from it (regimes, counts, device)."""
    resolved = {
        "base_regime": plan.base_regime.to_dict(),
        "effective_regime": plan.regime.to_dict(),
        "dataset_size": plan.dataset_size,
        "updates_per_epoch": plan.updates_per_epoch,
        "num_updates": plan.num_updates,
        "device": str(plan.device),
        "world_size": plan.world_size,
        "num_parameters": sum(p.numel() for p in state.model.parameters()),
    }
    atomic_write_text(run_dir / "config.toml", plan.config.to_toml(extra={RESOLVED_KEY: resolved}))


def save(run_dir: Path, state: TrainState, plan: Plan, ctx: Any, *, best: bool) -> None:
    """``checkpoints/last.pt`` (and ``best.pt``): the whole state, every process's RNG state.

    Every process calls this at the same update: it gathers the random-number states (a
    collective) so that a resume continues each process's own dropout stream; rank 0 writes.
    """
    rng_per_rank = distributed.gather_objects(rng_state(plan.device), ctx)
    if not ctx.is_main:
        return
    data = checkpoint_bytes(_checkpoint(state, plan, rng_per_rank))
    save_checkpoint(run_dir / CHECKPOINT_DIR / "last.pt", data)
    if best:
        save_checkpoint(run_dir / CHECKPOINT_DIR / "best.pt", data)


def _checkpoint(state: TrainState, plan: Plan, rng_per_rank: list[dict]) -> dict[str, Any]:
    """The checkpoint: a plain dict, so that ``torch.load(weights_only=True)`` accepts it. It
    keeps rank 0's RNG state as ``rng``, and all of them under DDP."""
    c = state.counters
    return {
        "rng_per_rank": rng_per_rank if plan.world_size > 1 else None,
        "format": CHECKPOINT_FORMAT,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "weight_distance": state.weight_distance.state_dict(),
        **state.extra_state_dict(),
        "rng": rng_per_rank[0],
        "epoch": c.updates // plan.updates_per_epoch,
        "step_in_epoch": c.updates % plan.updates_per_epoch,
        "updates": c.updates,
        "num_updates": plan.num_updates,
        "counters": dataclasses.asdict(c),
        "config": plan.config.to_dict(),
        "bigbatch_version": bigbatch.__version__,
        "world_size": plan.world_size,
        "elastic_job_id": distributed.elastic_job_id(),
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` of a complete run (see :func:`summary`)."""
    atomic_write_json(run_dir / "summary.json", summary)


def write_failed_summary(run_dir: Path, config: RunConfig, updates: int, message: str) -> None:
    """``summary.json`` with ``status = "diverged"``."""
    atomic_write_json(
        run_dir / "summary.json",
        {
            "status": "diverged",
            "message": message,
            "updates": updates,
            "seed": config.seed,
            "model": config.model,
            "dataset": config.dataset,
        },
    )


def summary(run_dir: Path, counters: Counters, plan: Plan, row: dict[str, Any],
            *, is_main: bool) -> dict[str, Any]:
    """The complete run's summary: final and best errors, speed, and the evidence beside them."""
    c, cfg, device = counters, plan.config, plan.device
    rows = read_rows(run_dir / "metrics.jsonl") if is_main else []
    last = rows[-1] if rows else row  # the final evaluation, also when resumed at the end
    train_time = c.train_time_s + c.interval_train_time_s
    return _rounded({
        "status": "complete",
        "seed": cfg.seed,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "batch_size": cfg.batch_size,
        "base_batch_size": cfg.base_batch_size,
        "ghost_batch_size": cfg.ghost_batch_size,
        "micro_batch_size": cfg.micro_batch_size,
        "lr_scaling": cfg.lr_scaling,
        "regime_adaptation": cfg.regime_adaptation,
        "epochs": plan.regime.epochs,
        "updates": c.updates,
        "samples": c.samples,
        "skipped_steps": c.skipped_steps,
        "final_val_error_pct": last.get("val_error_pct"),
        "final_val_top5_error_pct": last.get("val_top5_error_pct"),
        "best_val_error_pct": c.best_val_error_pct,
        "final_train_error_pct": last.get("train_error_pct"),
        "final_weight_distance": last.get("weight_distance"),
        "wall_time_s": c.wall_time_s,
        "train_time_s": train_time,
        "train_samples_per_s": (c.samples - c.untimed_samples) / train_time
        if train_time > 0 else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "world_size": plan.world_size,
        "torch_version": torch.__version__,
        # Which ghost batch norm code ran (C kernels, Triton, PyTorch ops, and why): speed differs.
        "ghost_bn_backend": backend_summary(device) if cfg.ghost_batch_size else None,
        "bigbatch_version": bigbatch.__version__,
        "git_commit": _git_commit(),
    })


def _rounded(summary: dict[str, Any]) -> dict[str, Any]:
    """Floats to what they mean: errors (``*_pct``) to 4 decimals, times, rates and the weight
    distance to 4 significant digits, other floats (epochs) to 6 significant digits.

    Example:
        >>> _rounded({"epochs": 1.4800000000000035, "wall_time_s": 12.34567, "x_pct": 1 / 3})
        {'epochs': 1.48, 'wall_time_s': 12.35, 'x_pct': 0.3333}
    """
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, float) and math.isfinite(value) and value != 0:
            digits = 4 if key.endswith(("_s", "_distance")) else 6
            value = (round(value, 4) if key.endswith("_pct")
                     else round(value, digits - 1 - math.floor(math.log10(abs(value)))))
        out[key] = value
    return out


# -- helpers --------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random-number state (CPU, and CUDA when training there)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
