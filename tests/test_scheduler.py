"""RegimeScheduler: the regime at each update, per-group ratios, exact resume via state_dict."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bigbatch.errors import ConfigError
from bigbatch.recipes import (
    Regime,
    RegimeScheduler,
    adapt_regime,
    build_optimizer,
    num_updates,
    updates_per_epoch,
)

BASE = {"epochs": 3, "phases": [{"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                                {"epoch": 2, "lr": 0.01, "momentum": 0.5}]}


def _adapted(schedule: str) -> Regime:
    return adapt_regime({**BASE, "schedule": schedule}, 16, 64, warmup_epochs=1.5)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_every_update_gets_the_regimes_settings(schedule):
    regime, upe = _adapted(schedule), updates_per_epoch(200, 64)
    opt = build_optimizer(torch.nn.Linear(3, 2).parameters(), regime)
    scheduler = RegimeScheduler(opt, regime, upe)
    lrs = []
    for update in range(num_updates(regime, 200, 64)):
        expected = regime.settings_at(update / upe)
        assert {k: opt.param_groups[0][k] for k in expected} == expected, update
        assert scheduler.get_last_lr() == [expected["lr"]]
        lrs.append(expected["lr"])
        opt.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1) and 0.18 < max(lrs) <= 0.2  # warm-up from 0.1 to 0.2
    assert len(set(lrs)) >= 7  # a real ramp (and cosine) was applied, not a constant


@given(upe=st.integers(1, 7), milestone=st.floats(0.1, 2.9), warmup=st.floats(0.0, 1.0))
def test_the_lr_is_settings_at_updates_over_updates_per_epoch(upe, milestone, warmup):
    regime = Regime.from_dict({"epochs": 3, "warmup_epochs": warmup, "phases": [
        {"epoch": 0, "lr": 0.3}, {"epoch": milestone, "lr": 0.03}]})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    scheduler = RegimeScheduler(opt, regime, upe)
    for update in range(3 * upe + 2):  # past the end: the last phase stays
        assert opt.param_groups[0]["lr"] == regime.settings_at(update / upe)["lr"]
        opt.step()
        scheduler.step()


def test_groups_keep_their_ratio_to_the_defaults():
    regime, upe = _adapted("step"), 4
    a, bn = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [bn], "lr": 0.05, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, weight_decay=5e-4)
    scheduler = RegimeScheduler(opt, regime, upe)
    for update in range(num_updates(regime, 4 * 64, 64)):
        settings = regime.settings_at(update / upe)
        main, other = opt.param_groups
        assert (main["lr"], main["weight_decay"]) == (settings["lr"], settings["weight_decay"])
        assert other["lr"] == pytest.approx(settings["lr"] / 2) and other["weight_decay"] == 0.0
        assert other["momentum"] == main["momentum"] == settings["momentum"]
        assert scheduler.get_last_lr() == [main["lr"], other["lr"]]
        opt.step()
        scheduler.step()


def _train(model, opt, scheduler, batches):
    for x in batches:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        scheduler.step()


def _setup(regime):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.05,
                           "weight_decay": 0.0}], lr=0.1, momentum=0.9, weight_decay=5e-4)
    return model, opt, RegimeScheduler(opt, regime, 5)


def test_resume_through_state_dicts_continues_exactly():
    regime = _adapted("cosine")
    batches = list(torch.randn(40, 8, 3, generator=torch.Generator().manual_seed(1)))
    reference = _setup(regime)
    _train(*reference, batches)

    model, opt, scheduler = _setup(regime)
    _train(model, opt, scheduler, batches[:17])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _setup(regime)  # fresh: at update 0
    resumed[2].load_state_dict(saved["sched"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[0].load_state_dict(saved["model"])
    assert resumed[2].last_epoch == 17 and resumed[2].get_last_lr() == scheduler.get_last_lr()
    _train(*resumed, batches[17:])
    assert torch.equal(resumed[0].weight, reference[0].weight)
    assert torch.equal(resumed[0].bias, reference[0].bias)
    assert resumed[2].get_last_lr() == reference[2].get_last_lr()
    assert not torch.equal(reference[0].weight, _setup(regime)[0].weight)  # it did train


def test_load_state_dict_alone_puts_the_optimizer_at_that_update():
    regime = _adapted("step")
    _, opt, scheduler = _setup(regime)
    for _ in range(31):
        opt.step()
        scheduler.step()
    _, fresh_opt, fresh = _setup(regime)
    fresh.load_state_dict(scheduler.state_dict())
    for key in ("lr", "momentum", "weight_decay"):
        assert [g[key] for g in fresh_opt.param_groups] == [g[key] for g in opt.param_groups]


def test_bad_arguments_are_named():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="unknown setting for Adam 'momentum'"):
        RegimeScheduler(opt, BASE, 3)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="updates_per_epoch must be a positive integer"):
        RegimeScheduler(sgd, BASE, 0)
    scheduler = RegimeScheduler(sgd, BASE, 3)
    with pytest.raises(ValueError, match="takes no epoch"):
        scheduler.step(3)


def test_any_setting_the_regime_names_and_a_tensor_lr():
    regime = Regime.from_dict({"optimizer": "Adam", "epochs": 2, "phases": [
        {"epoch": 0, "lr": 1e-3, "betas": [0.9, 0.999]},
        {"epoch": 1, "lr": 1e-4, "betas": [0.5, 0.9]}]})
    lr = torch.tensor(1e-3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scheduler = RegimeScheduler(opt, regime, 2)
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["betas"] == (0.5, 0.9)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-4)
    last = scheduler.get_last_lr()[0]
    assert last is not lr and float(last) == pytest.approx(1e-4)  # a copy, as torch's schedulers
