"""AdaScale: the gain ratio's limits, tau accounting against the base regime, exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bigbatch.diagnostics import GradientNoiseScale
from bigbatch.recipes import Regime
from bigbatch.recipes.adascale import AdaScale, adascale_gain

REGIME = Regime.from_dict({
    "epochs": 3, "warmup_epochs": 0.5, "warmup_start_factor": 0.1,
    "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9}, {"epoch": 2, "lr": 0.01}],
})


def test_gain_is_one_without_noise_and_s_for_pure_noise():
    assert adascale_gain(0.0, 2.5, 4096, 128) == 1.0
    assert adascale_gain(3.0, 0.0, 4096, 128) == 32.0
    assert adascale_gain(0.0, 0.0, 4096, 128) == 1.0  # nothing known: no gain
    assert adascale_gain(1.0, 1.0, 128, 128) == 1.0  # S = 1


def test_gain_equals_the_ratio_of_optimal_lrs_in_b_simple():
    """r = (1 + B_simple / B0) / (1 + B_simple / B), the epsilon_opt ratio of McCandlish et al."""
    trace, grad_sq = 300.0, 0.5  # B_simple = 600
    b_simple = trace / grad_sq
    assert adascale_gain(trace, grad_sq, 2048, 256) == pytest.approx(
        (1 + b_simple / 256) / (1 + b_simple / 2048))


@given(trace=st.floats(-10, 1e6), grad_sq=st.floats(-10, 1e6), base=st.integers(1, 512),
       scale=st.integers(1, 64))
def test_gain_lies_in_one_to_s(trace, grad_sq, base, scale):
    r = adascale_gain(trace, grad_sq, base * scale, base)
    assert 1.0 <= r <= scale


def test_gain_errors():
    with pytest.raises(ValueError, match=r"batch_size \(64\) must be >= base_batch_size \(128\)"):
        adascale_gain(1.0, 1.0, 64, 128)
    with pytest.raises(ValueError, match="base_batch_size must be a finite number > 0, got 0"):
        adascale_gain(1.0, 1.0, 64, 0)
    assert adascale_gain(math.nan, math.nan, 256, 128) == 1.0


def test_gain_one_follows_the_base_regime_update_by_update():
    ada = AdaScale(REGIME, base_updates_per_epoch=10)
    settings = []
    while not ada.done:
        settings.append(ada.step(1.0))
    assert len(settings) == 30 == ada.num_updates  # the small-batch run's updates
    assert settings == [REGIME.settings_at(t / 10) for t in range(30)]  # warm-up and milestone


@pytest.mark.parametrize("gain", [2.0, 3.0, 7.0, 32.0, 1.5])
def test_constant_gain_ends_at_the_small_batch_number_of_updates(gain):
    ada = AdaScale(REGIME, base_updates_per_epoch=10)
    lrs = []
    while not ada.done:
        lrs.append(ada.step(gain)["lr"])
    assert len(lrs) == math.ceil(30 / gain)
    assert ada.tau >= 30 and ada.tau - gain < 30  # stopped at the first update reaching T
    # update t runs at gain * lr_base(tau_t = t * gain), milestones and warm-up taken in tau
    expected = [gain * REGIME.settings_at(t * gain / 10)["lr"] for t in range(len(lrs))]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_varying_gain_accumulates_tau():
    ada = AdaScale(REGIME, base_updates_per_epoch=10)
    gains = [1.0, 2.0, 4.0, 4.0, 1.5]
    lrs = [ada.step(g)["lr"] for g in gains]
    taus = [0.0, 1.0, 3.0, 7.0, 11.0]
    assert lrs == pytest.approx([g * REGIME.settings_at(t / 10)["lr"]
                                 for g, t in zip(gains, taus, strict=True)])
    assert ada.tau == 12.5 and ada.epoch == 1.25 and ada.last_gain == 1.5 and not ada.done


def test_driven_by_a_noise_estimate():
    """The loop of the class docstring, with a pure-noise then a noise-free gradient."""
    noise, ada = GradientNoiseScale(decay=0.0), AdaScale(REGIME, base_updates_per_epoch=10)
    assert ada.step(noise.gain(512, 128))["lr"] == pytest.approx(REGIME.settings_at(0)["lr"])
    noise.update(small_sq_norm=2.0, small_batch_size=128, big_sq_norm=0.5, big_batch_size=512)
    assert noise.grad_sq_norm == 0.0 and noise.gain(512, 128) == 4.0  # all noise
    ada.step(noise.gain(512, 128))
    assert ada.tau == 5.0


def test_resume_continues_exactly():
    gains = [1.0 + 0.37 * (i % 5) for i in range(20)]
    uninterrupted = AdaScale(REGIME, base_updates_per_epoch=10)
    expected = [uninterrupted.step(g) for g in gains]
    first = AdaScale(REGIME, base_updates_per_epoch=10)
    got = [first.step(g) for g in gains[:8]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdaScale(REGIME, base_updates_per_epoch=10)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += [resumed.step(g) for g in gains[8:]]
    assert got == expected and resumed.state_dict() == uninterrupted.state_dict()
    # negative control: a fresh object restarts the schedule at tau = 0
    assert AdaScale(REGIME, base_updates_per_epoch=10).step(gains[8]) != expected[8]


def test_errors():
    with pytest.raises(ValueError, match="regime must be a Regime, got dict"):
        AdaScale({"epochs": 1}, base_updates_per_epoch=10)
    with pytest.raises(ValueError, match="base_updates_per_epoch must be an integer >= 1, got 0"):
        AdaScale(REGIME, base_updates_per_epoch=0)
    ada = AdaScale(REGIME, base_updates_per_epoch=10)
    with pytest.raises(ValueError, match="gain must be a finite number > 0, got -1"):
        ada.step(-1.0)
    with pytest.raises(ValueError, match="missing \\['last_gain', 'num_updates'"):
        ada.load_state_dict({})
    other = AdaScale(REGIME, base_updates_per_epoch=20).state_dict()
    with pytest.raises(ValueError, match="lasts 60 small-batch updates, this one 30"):
        ada.load_state_dict(other)


def test_drives_a_training_loop_with_micro_batches():
    """The wiring the engine will use: micro-batch norms -> noise estimate -> gain -> lr and tau."""
    from torch import nn

    from bigbatch.diagnostics import MicroBatchGradNorms, squared_grad_norm
    from bigbatch.recipes import apply_settings, build_optimizer

    torch.manual_seed(0)
    w_true = torch.randn(5, 1)
    model = nn.Linear(5, 1, bias=False)
    regime = Regime.from_dict({"epochs": 4, "phases": [{"epoch": 0, "lr": 0.05},
                                                       {"epoch": 3, "lr": 0.005}]})
    base_batch, batch, micro = 8, 64, 8
    opt = build_optimizer(model.parameters(), regime)
    ada, noise = AdaScale(regime, base_updates_per_epoch=10), GradientNoiseScale(decay=0.9)
    norms = MicroBatchGradNorms(model.parameters())
    x_val = torch.randn(512, 5)
    y_val = x_val @ w_true
    def val_loss() -> float:
        with torch.no_grad():
            return float(nn.functional.mse_loss(model(x_val), y_val))

    start = val_loss()
    while not ada.done:
        gain = noise.gain(batch, base_batch)
        settings = ada.step(gain)
        apply_settings(opt, settings)
        assert opt.param_groups[0]["lr"] == settings["lr"]
        x = torch.randn(batch, 5)
        y = x @ w_true + 2.0 * torch.randn(batch, 1)  # noisy labels: the gain must exceed 1
        opt.zero_grad()
        for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
            (nn.functional.mse_loss(model(xs), ys) / (batch // micro)).backward()
            norms.end_micro_batch()
        small = norms.pop(grad_multiplier=batch // micro).mean()
        noise.update(small, micro, squared_grad_norm(model.parameters()), batch)
        opt.step()
    assert ada.tau >= 40 and ada.num_updates < 40  # fewer updates than the base run's 40
    assert 1.0 < ada.last_gain <= batch / base_batch
    assert val_loss() < 0.5 * start
