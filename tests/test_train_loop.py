"""The training loop: micro-batch accumulation, clipping, outputs, divergence."""

from __future__ import annotations

import json

import pytest
import torch

from bigbatch import data
from bigbatch.errors import ConfigError, DivergenceError
from bigbatch.train import RunConfig, forward_backward, load_checkpoint, train
from bigbatch.train.build import build_model
from bigbatch.train.metrics import read_rows
from bigbatch.train.step import grad_norm

TINY = {"hidden": 16, "depth": 2}
REGIME = {"epochs": 2, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
                                  {"epoch": 1, "lr": 0.01}]}


def _config(**changes) -> RunConfig:
    base = dict(model="f1", model_options=TINY, dataset="synthetic", batch_size=256,
                regime=REGIME, progress="none", device="cpu")
    return RunConfig(**{**base, **changes})


def _sgd_updates(ghost: int | None, micro: int | None, lr: float = 0.1, steps: int = 3):
    torch.manual_seed(0)
    model = build_model(_config(ghost_batch_size=ghost), data.DATASETS["synthetic"]).double()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(256, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (256,), generator=g)
        opt.zero_grad()
        forward_backward(model, x, y, micro_batch_size=micro)
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()] +
                     [b.detach().flatten().double() for b in model.buffers()])


def test_micro_batches_match_one_pass():
    one_pass = _sgd_updates(ghost=32, micro=None)
    micro = _sgd_updates(ghost=32, micro=64)  # every ghost batch inside one micro-batch
    torch.testing.assert_close(micro, one_pass, rtol=1e-10, atol=1e-12)
    # negative controls: plain BN over the whole batch is not what micro-batches compute, and a
    # different lr changes the weights (the comparison above is sensitive)
    assert not torch.allclose(_sgd_updates(ghost=None, micro=64), _sgd_updates(None, None))
    assert not torch.allclose(_sgd_updates(ghost=32, micro=64, lr=0.11), one_pass)


def test_micro_batches_match_one_pass_through_the_engine(tmp_path):
    a = train(_config(ghost_batch_size=32), tmp_path / "a")
    b = train(_config(ghost_batch_size=32, micro_batch_size=64), tmp_path / "b")
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert a["final_val_error_pct"] == pytest.approx(b["final_val_error_pct"], abs=0.5)


def test_clipping_bounds_the_gradient_norm():
    model = torch.nn.Linear(10, 10)
    (model(torch.randn(8, 10)) * 100).sum().backward()
    params = list(model.parameters())
    before = grad_norm(params, None)
    assert before > 1.0
    returned = grad_norm(params, 1.0)
    assert returned == pytest.approx(before.item(), rel=1e-6)  # the norm before clipping
    assert grad_norm(params, None) <= 1.0 + 1e-5


def test_a_run_writes_every_output(tmp_path):
    summary = train(_config(ghost_batch_size=64, eval_every=5), tmp_path)
    assert summary["status"] == "complete" and summary["updates"] == 16  # 2 epochs x 8
    for name in ("config.toml", "metrics.csv", "metrics.jsonl", "diffusion.csv", "diffusion.jsonl",
                 "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / name).is_file(), name
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["updates"] for r in rows] == [5, 10, 15, 16]
    assert rows == read_rows(tmp_path / "metrics.jsonl")
    expected = {"updates", "epoch", "samples", "lr", "train_loss", "train_error_pct", "val_loss",
                "val_error_pct", "val_top5_error_pct", "weight_distance", "wall_time_s",
                "samples_per_s", "skipped_steps",
                # the noise-scale columns are in every row, empty without --noise-scale
                "trace_sigma", "grad_sq_norm", "b_simple", "adascale_gain", "adascale_tau"}
    assert set(rows[0]) == expected
    assert rows[-1]["lr"] == pytest.approx(0.01) and rows[0]["lr"] == pytest.approx(0.1)
    assert rows[-1]["val_error_pct"] < 60  # it learns something on the synthetic classes
    diffusion = read_rows(tmp_path / "diffusion.jsonl")
    updates = [r["updates"] for r in diffusion]
    assert updates == sorted(set(updates)) and {1, 2, 3, 5, 10, 16} <= set(updates)
    assert set(diffusion[0]["per_parameter"]) == {n for n, _ in build_model(
        _config(), data.DATASETS["synthetic"]).named_parameters()}
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ck["updates"] == 16 and ck["config"]["ghost_batch_size"] == 64
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_finished_run_is_not_overwritten(tmp_path):
    train(_config(), tmp_path)
    with pytest.raises(ConfigError, match="already holds a run.*--resume"):
        train(_config(), tmp_path)
    again = train(_config(), tmp_path, resume=True)  # complete: returns the summary
    assert again["status"] == "complete"
    with pytest.raises(ConfigError, match="batch_size was 256, now 512"):
        train(_config(batch_size=512), tmp_path, resume=True)


def test_a_one_sample_ghost_batch_is_refused_before_training(tmp_path):
    # 2048 samples at batch 300: six batches of 300 and a last one of 248; ghost 299 leaves a
    # ghost batch of 1 in each 300-sample batch
    with pytest.raises(ConfigError, match="last ghost batch of 1 sample"):
        train(_config(batch_size=300, ghost_batch_size=299), tmp_path)


HUGE = {"epochs": 2, "phases": [{"epoch": 0, "lr": 1e30, "momentum": 0.9}]}


def test_divergence_stops_with_a_helpful_message(tmp_path):
    with pytest.raises(DivergenceError, match=r"diverged at update \d+ of 16.*warm-up"):
        train(_config(regime=HUGE), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert not (tmp_path / "checkpoints" / "last.pt").exists()  # nothing saved with NaN in it


def test_divergence_skip_counts_skipped_steps(tmp_path, caplog):
    summary = train(_config(regime=HUGE, on_nonfinite="skip"), tmp_path)
    assert summary["status"] == "complete" and 0 < summary["skipped_steps"] < 16
    rows = read_rows(tmp_path / "metrics.csv")
    assert rows[-1]["skipped_steps"] == summary["skipped_steps"]
    assert any("skipped update" in r.getMessage() for r in caplog.records)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    # the skipped updates left no NaN behind, in the weights or in the BN running statistics
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_warmup_and_lr_scaling_reach_the_optimizer(tmp_path):
    cfg = _config(batch_size=512, lr_scaling="linear", warmup_epochs=1.0, eval_every=1)
    train(cfg, tmp_path)
    lrs = [r["lr"] for r in read_rows(tmp_path / "metrics.csv")]
    # 4 updates per epoch; lr applied at epoch 0, .25, .5, .75 ramps from 0.1 to 0.4 (x4 linear)
    assert lrs[:4] == pytest.approx([0.1, 0.175, 0.25, 0.325])
    assert lrs[4] == pytest.approx(0.04)  # epoch 1: second phase 0.01 x 4


@pytest.mark.gpu
def test_gpu_run_with_bf16_and_channels_last(tmp_path):
    cfg = _config(device="cuda", amp="bf16", model="c1", model_options={})
    summary = train(cfg, tmp_path)
    assert summary["status"] == "complete" and summary["device"].startswith("cuda")
