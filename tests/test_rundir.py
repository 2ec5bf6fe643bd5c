"""The run directory: a checkpoint holds the whole train state and a resume puts it back exactly."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch.distributed import DistContext
from bigbatch.errors import ConfigError
from bigbatch.train import RunConfig, load_checkpoint, rundir
from bigbatch.train.build import build_run

TINY = {"hidden": 16, "depth": 2}
CHECKPOINT_KEYS = {"rng_per_rank", "format", "model", "optimizer", "weight_distance", "rng",
                   "epoch", "step_in_epoch", "updates", "num_updates", "counters", "config",
                   "bigbatch_version", "world_size", "elastic_job_id"}


def _config(**changes) -> RunConfig:
    return RunConfig(**{"model": "f1", "model_options": TINY, "dataset": "synthetic",
                        "batch_size": 256, "epochs": 1, "device": "cpu", "progress": "none",
                        **changes})


def _trained_a_little(run) -> None:
    x = torch.randn(32, 1, 8, 8)
    loss = run.train_model(x).square().mean()
    loss.backward()
    run.state.optimizer.step()
    run.state.counters.updates, run.state.counters.samples = 3, 768


def test_save_then_restore_gives_back_the_whole_state(tmp_path):
    ctx = DistContext()
    run = build_run(_config(), ctx, tmp_path)
    _trained_a_little(run)
    rundir.save(tmp_path, run.state, run.plan, ctx, best=True)
    expected_draw = torch.rand(4)  # the RNG stream continues from the saved state

    fresh = build_run(_config(), ctx, tmp_path)
    a, b = run.state.model.state_dict(), fresh.state.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # negative control: not yet restored
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert set(checkpoint) == CHECKPOINT_KEYS  # the checkpoint format is unchanged
    rundir.restore(fresh.state, checkpoint, ctx)
    b = fresh.state.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.state.counters == run.state.counters
    assert str(fresh.state.optimizer.state_dict()) == str(run.state.optimizer.state_dict())
    assert fresh.state.weight_distance(fresh.state.model)[0] > 0  # the origin is the saved w0
    assert torch.equal(torch.rand(4), expected_draw)
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def test_samples_of_an_untimed_old_checkpoint_stay_out_of_the_throughput(tmp_path):
    ctx = DistContext()
    run = build_run(_config(), ctx, tmp_path)
    _trained_a_little(run)  # 768 samples
    rundir.save(tmp_path, run.state, run.plan, ctx, best=False)
    checkpoint = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key in ("train_time_s", "interval_train_time_s", "interval_samples", "untimed_samples"):
        del checkpoint["counters"][key]  # as bigbatch < 0.2 wrote it: training was not timed
    fresh = build_run(_config(), ctx, tmp_path)
    rundir.restore(fresh.state, checkpoint, ctx)
    c = fresh.state.counters
    assert (c.samples, c.untimed_samples, c.train_time_s) == (768, 768, 0.0)
    c.samples, c.train_time_s = 768 + 256, 0.5  # one timed update after the resume
    summary = rundir.summary(tmp_path, c, fresh.plan, {}, is_main=False)
    assert summary["train_samples_per_s"] == 512  # not (768 + 256) / 0.5

    rundir.restore(fresh.state, load_checkpoint(tmp_path / "checkpoints" / "last.pt"), ctx)
    assert fresh.state.counters.untimed_samples == 0  # a timed checkpoint: every sample counts


def test_a_resume_with_another_config_is_refused_naming_the_key(tmp_path):
    ctx = DistContext()
    run = build_run(_config(), ctx, tmp_path)
    rundir.save(tmp_path, run.state, run.plan, ctx, best=False)
    with pytest.raises(ConfigError, match="already holds a run; continue it with"):
        rundir.prepare_run_dir(tmp_path, _config(), resume=False, auto_resume=False, ctx=ctx)
    with pytest.raises(ConfigError, match="different config: seed was 0, now 1"):
        rundir.prepare_run_dir(tmp_path, _config(seed=1), resume=True, auto_resume=False, ctx=ctx)
    # keys that do not change what is computed may change
    free = _config(eval_batch_size=7, progress="log", out=str(tmp_path))
    state = rundir.prepare_run_dir(tmp_path, free, resume=True, auto_resume=False, ctx=ctx)
    assert state["updates"] == 0


def test_a_resume_without_a_checkpoint_starts_over(tmp_path):
    (tmp_path / "metrics.csv").write_text("updates\n1\n")
    state = rundir.prepare_run_dir(tmp_path, _config(), resume=True, auto_resume=False,
                                   ctx=DistContext())
    assert state is None and not (tmp_path / "metrics.csv").exists()
    # The directory is created once the run is built (a run that fails to build leaves none).
    assert not (tmp_path / "checkpoints").exists()
    rundir.create_run_dir(tmp_path, DistContext())
    assert (tmp_path / "checkpoints").is_dir()


@pytest.mark.parametrize("text", [None, "{\"status\": \"compl", "[1, 2]"])
def test_read_summary_of_a_missing_torn_or_odd_file_is_empty(tmp_path, text):
    if text is not None:
        (tmp_path / "summary.json").write_text(text)
    assert rundir.read_summary(tmp_path) == {}
    (tmp_path / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert rundir.read_summary(tmp_path) == {"status": "complete"}


def test_fixed_keys_are_the_keys_that_change_results():
    assert rundir.fixed_keys(["device", "batch_size", "out", "clip"]) == ["batch_size", "clip"]
