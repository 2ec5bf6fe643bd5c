"""Building a run: the model, and the checks made before training (batch splits over processes,
ghost batches that batch norm can normalise)."""

from __future__ import annotations

import pytest
import torch

from bigbatch import data
from bigbatch.distributed import DistContext
from bigbatch.errors import ConfigError
from bigbatch.layers import GhostBatchNorm1d
from bigbatch.train import RunConfig
from bigbatch.train.build import (
    build_model,
    build_run,
    check_ghost_alignment,
    check_process_split,
    shard_batch_size,
)

TINY = {"hidden": 16, "depth": 2}


@pytest.mark.parametrize(
    ("batch_size", "world_size", "message"),
    [
        (1000, 3, r"batch_size=1000 .* processes \(3\); use --batch-size 999 or 1002, or launch"),
        (4096, 6, r"use --batch-size 4092 or 4098"),
        (3, 4, r"use --batch-size 4, or launch a number of processes that divides 3"),
        (0, 2, r"must be positive"),
    ],
)
def test_shard_batch_size_errors(batch_size, world_size, message):
    with pytest.raises(ConfigError, match=message):
        shard_batch_size(batch_size, world_size)


def test_shard_batch_size():
    assert shard_batch_size(4096, 8) == 512
    assert shard_batch_size(128, 1) == 128


@pytest.mark.parametrize(
    ("per_rank", "ghost", "message"),
    [
        (1000, 128, r"ghost_batch_size=128 does not divide the per-process batch of 1000 .* "
                    r"--ghost-batch-size 125 or 200, or a global batch that is a multiple of 128"),
        (96, 64, r"--ghost-batch-size 48 or 96"),
        (8, 16, r"ghost_batch_size=16 does not divide .* of 8 samples"),
    ],
)
def test_check_ghost_alignment_errors(per_rank, ghost, message):
    with pytest.raises(ConfigError, match=message):
        check_ghost_alignment(per_rank, ghost)
    check_ghost_alignment(per_rank, ghost, exact=False)  # accepted when not exact


@pytest.mark.parametrize(("per_rank", "ghost"), [(512, 128), (128, 128), (96, 32), (7, None)])
def test_check_ghost_alignment_accepts(per_rank, ghost):
    check_ghost_alignment(per_rank, ghost)


def test_check_process_split_reads_the_config():
    two = DistContext(rank=0, world_size=2, enabled=True)
    check_process_split(RunConfig(dataset="synthetic", batch_size=64, ghost_batch_size=16), two)
    with pytest.raises(ConfigError, match="does not divide the per-process batch of 32"):
        check_process_split(RunConfig(dataset="synthetic", batch_size=64, ghost_batch_size=24), two)
    inexact = RunConfig(dataset="synthetic", batch_size=64, ghost_batch_size=24,
                        exact_ghost_alignment=False)
    check_process_split(inexact, two)
    check_process_split(RunConfig(dataset="synthetic", batch_size=64, ghost_batch_size=24),
                        DistContext())  # one process: nothing to align


def test_build_run_plans_the_updates_from_the_loader(tmp_path):
    # 1001 samples at batch 100: the loader drops the last batch of 1 sample, so an epoch has 10
    # updates (not ceil(1001 / 100) = 11), and 2.5 epochs are 25 updates.
    config = RunConfig(model="f1", model_options=TINY, dataset="synthetic", batch_size=100,
                       train_subset=1001, epochs=2.5, device="cpu", progress="none")
    run = build_run(config, DistContext(), tmp_path)
    assert (run.plan.dataset_size, run.plan.updates_per_epoch, run.plan.num_updates) == (
        1001, 10, 25)
    assert [run.train_loader.batch_size_at(k) for k in (0, 9)] == [100, 100]
    assert run.state.counters.updates == 0 and run.shard is None and run.no_sync() is None
    assert run.state.model is run.train_model  # no DDP, no compile
    assert list(tmp_path.iterdir()) == []  # building writes nothing


def test_build_model_converts_to_ghost_batch_norm_for_the_datasets_shape():
    info = data.DATASETS["synthetic"]
    model = build_model(RunConfig(dataset="synthetic", model_options=TINY, batch_size=64,
                                  ghost_batch_size=16), info)
    ghost = [m for m in model.modules() if isinstance(m, GhostBatchNorm1d)]
    assert ghost and all(m.ghost_batch_size == 16 for m in ghost)
    assert model(torch.randn(32, *info.input_shape)).shape == (32, info.num_classes)
    plain = build_model(RunConfig(dataset="synthetic", model_options=TINY), info)
    assert not any(isinstance(m, GhostBatchNorm1d) for m in plain.modules())
