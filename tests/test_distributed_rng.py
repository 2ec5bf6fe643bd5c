"""Under DDP each process draws its own dropout masks, and a resume continues each one's stream.

Three 2-process gloo jobs of ``train()`` on CPU with a small MLP that has dropout ('synthetic' data,
global batch 32 = 2 x 16, ghost batches of 8, 2 epochs = 128 updates, a checkpoint every 32):

* ``full``: uninterrupted; a spy records the first dropout mask each process draws;
* ``resumed``: the same job, stopped on every process right after its first checkpoint, then
  resumed in a new 2-process job: its metrics must equal ``full``'s bit for bit;
* ``reseeded``: the same, but the checkpoint's per-process random states removed first (as in a
  checkpoint from before they were kept, or a resume on another number of processes): it falls back
  to reseeding, and must *differ* from ``full`` (the negative control that shows the test sees
  dropout at all).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from procs import free_port, spawn_and_wait
from torch import nn

from bigbatch import models
from bigbatch.models.registry import step_regime
from bigbatch.train import RunConfig, rundir, train
from bigbatch.train.checkpoint import load_checkpoint, save_checkpoint
from bigbatch.train.metrics import read_rows

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
MODEL = "mlp_dropout_test"
CONFIG = {
    "model": MODEL, "dataset": "synthetic", "batch_size": 32, "ghost_batch_size": 8,
    "epochs": 2, "eval_every": 32, "device": "cpu", "seed": 3, "progress": "none",
}  # fmt: skip
TIMING_KEYS = {"wall_time_s", "samples_per_s", "train_time_s", "train_samples_per_s"}


def _mlp_with_dropout(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A test MLP with batch norm and dropout 0.5."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(in_channels * image_size**2, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Dropout(0.5), nn.Linear(16, num_classes),
    )  # fmt: skip


if MODEL not in models.names():  # also runs in each spawned process, which imports this file
    regime = step_regime(2, 0.1, momentum=0.9, weight_decay=0.0, drops={1: 0.01})
    models.register(MODEL, default_dataset="synthetic", default_regime=regime)(_mlp_with_dropout)


class _Stop(Exception):
    pass


def _worker(rank: int, port: int, out_dir: str, job: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    run_dir = Path(out_dir) / "run"
    if job == "full":
        masks = []
        dropout = torch.nn.functional.dropout

        def spy(x, *args, **kwargs):
            out = dropout(x, *args, **kwargs)
            if not masks and torch.is_grad_enabled():
                masks.append((out == 0).tolist())
            return out

        torch.nn.functional.dropout = spy
        train(RunConfig(**CONFIG), run_dir)
        (Path(out_dir) / f"mask{rank}.json").write_text(json.dumps(masks[0]))
    elif job == "stop_after_first_checkpoint":
        save = rundir.save

        def save_then_stop(*args, **kwargs):
            save(*args, **kwargs)
            raise _Stop  # on every process at the same update, like a job killed there

        rundir.save = save_then_stop
        with pytest.raises(_Stop):  # train() tears the process group down on the way out
            train(RunConfig(**CONFIG), run_dir)
    else:  # "resume"
        train(RunConfig(**CONFIG), run_dir, resume=True)


def _job(out_dir: Path, job: str) -> None:
    spawn_and_wait(_worker, (free_port(), str(out_dir), job), WORLD_SIZE)


def _metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in read_rows(run_dir / "metrics.csv")]  # fmt: skip


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Path]:
    full = tmp_path_factory.mktemp("full")
    _job(full, "full")
    out = {"full": full}
    for name in ("resumed", "reseeded"):
        out[name] = tmp_path_factory.mktemp(name)
        _job(out[name], "stop_after_first_checkpoint")
        last = out[name] / "run" / "checkpoints" / "last.pt"
        assert load_checkpoint(last)["updates"] == 32
        if name == "reseeded":
            state = load_checkpoint(last)
            state["rng_per_rank"] = None
            save_checkpoint(last, state)
        _job(out[name], "resume")
    return out


def test_each_process_draws_its_own_dropout_masks(jobs):
    mask0, mask1 = (json.loads((jobs["full"] / f"mask{r}.json").read_text()) for r in (0, 1))
    assert len(mask0) == len(mask1) == 16  # each process's 16 samples
    assert mask0 != mask1
    state = load_checkpoint(jobs["full"] / "run" / "checkpoints" / "last.pt")
    per_rank = state["rng_per_rank"]
    assert len(per_rank) == WORLD_SIZE
    assert not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])
    assert torch.equal(per_rank[0]["torch"], state["rng"]["torch"])  # rank 0's is also "rng"


def test_a_resume_continues_every_process_dropout_stream(jobs):
    full, resumed = _metrics(jobs["full"] / "run"), _metrics(jobs["resumed"] / "run")
    assert [r["updates"] for r in full] == [32, 64, 96, 128]
    assert resumed == full  # bit for bit, dropout included


def test_without_per_process_states_a_resume_reseeds_and_differs(jobs):
    full, reseeded = _metrics(jobs["full"] / "run"), _metrics(jobs["reseeded"] / "run")
    assert reseeded[0] == full[0]  # before the checkpoint: the same run
    assert [r["train_loss"] for r in reseeded[1:]] != [r["train_loss"] for r in full[1:]]
