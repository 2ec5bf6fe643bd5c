"""What a run does when a step or the weights become NaN/Inf: stop with a hint, or skip the update.

``on_nonfinite = "stop"`` (the default) writes a ``diverged`` summary and raises
:class:`~bigbatch.errors.DivergenceError`; ``"skip"`` counts the update as skipped and goes on.
Weights are checked before every checkpoint, so NaN weights never replace the last good one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from bigbatch.errors import DivergenceError
from bigbatch.train import rundir
from bigbatch.train.step import finite_params

if TYPE_CHECKING:
    from bigbatch.train.build import Run

__all__ = ["DIVERGENCE_HINT", "check_weights", "nonfinite_update"]

log = logging.getLogger("bigbatch.train")


def check_weights(run: Run) -> None:
    """Raise :class:`DivergenceError` if any weight is NaN/Inf (before a checkpoint is written)."""
    if not finite_params(run.state.model):
        raise DivergenceError(
            f"the weights became NaN/Inf by update {run.state.counters.updates}; "
            f"{run.run_dir / rundir.CHECKPOINT_DIR / 'last.pt'} keeps the last good state. "
            + DIVERGENCE_HINT
        )


def nonfinite_update(run: Run, loss_sum: float, norm: float, settings: dict[str, Any]) -> None:
    """Stop (``DivergenceError``, ``summary.json`` says diverged) or count a skipped update."""
    c, config = run.state.counters, run.plan.config
    lr = settings.get("lr", run.state.lr())
    where = (f"update {c.updates} of {run.plan.num_updates} "
             f"(epoch {run.plan.epoch(c.updates):.2f}, lr {lr:.4g})")  # fmt: skip
    what = f"loss sum {loss_sum} and gradient norm {norm}"
    if config.on_nonfinite == "stop":
        if run.ctx.is_main:
            message = f"non-finite {what} at {where}"
            rundir.write_failed_summary(run.run_dir, config, c.updates, message)
        last = run.run_dir / rundir.CHECKPOINT_DIR / "last.pt"
        kept = f"{last} keeps the last good state" if last.exists() else "no checkpoint yet"
        raise DivergenceError(f"training diverged at {where}: {what} ({kept}). " + DIVERGENCE_HINT)
    c.skipped_steps += 1
    run.state.optimizer.zero_grad(set_to_none=True)
    log.warning("skipped %s: %s (%d skipped so far)", where, what, c.skipped_steps)


DIVERGENCE_HINT = (
    "The learning rate is probably too high for this batch size: try a linear warm-up "
    "(--warmup-epochs), a gentler --lr-scaling (sqrt instead of linear, or none), gradient "
    "clipping (--clip), or --on-nonfinite skip to skip such updates."
)
