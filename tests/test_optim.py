"""Optimizers from regimes and settings applied in place, per param group (the issue 14 bug)."""

from __future__ import annotations

import pytest
import torch
from test_regime import PAPER_LIKE, paper_like

from bigbatch.errors import ConfigError
from bigbatch.recipes import Regime, apply_settings, build_optimizer
from bigbatch.recipes.optim import SCALE_KEY


# -- optimizer ------------------------------------------------------------------------------------
def _params():
    return [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))]


def test_build_optimizer_uses_phase0_settings_and_options():
    r = Regime.from_dict(paper_like(optimizer_options={"nesterov": True}))
    opt = build_optimizer(_params(), r)
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == \
        (0.1, 0.9, 1e-4, True)
    adam = build_optimizer(_params(), {"optimizer": "Adam", "epochs": 1,
                                       "phases": [{"epoch": 0, "lr": 1e-3, "betas": [0.8, 0.9]}]})
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["betas"] == (0.8, 0.9)


def test_build_optimizer_reports_rejected_values():
    r = Regime.from_dict(paper_like(phases=[{"epoch": 0, "lr": 0.1, "momentum": -1.0}]))
    with pytest.raises(ConfigError, match=r"cannot build SGD .*Invalid momentum"):
        build_optimizer(_params(), r)


def test_apply_settings_keeps_momentum_buffers():
    r = Regime.from_dict(paper_like())
    p = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer([p], r)
    p.grad = torch.full((3,), 2.0)
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    before = buf.clone()
    apply_settings(opt, r.settings_at(3.5))
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.state[p]["momentum_buffer"] is buf and torch.equal(buf, before)
    # The next step uses the kept buffer: buf <- 0.9 * buf + (g + wd * p); p <- p - 0.01 * buf.
    p_before = p.detach().clone()
    opt.step()
    expected_buf = 0.9 * before + (p.grad + 1e-4 * p_before)
    torch.testing.assert_close(p.detach(), p_before - 0.01 * expected_buf)
    # Negative control: rebuilding the optimizer (the official code's way) loses the buffer.
    assert "momentum_buffer" not in build_optimizer([p], r).state[p]


def test_apply_settings_rejects_unknown_keys_without_changing_anything():
    opt = build_optimizer(_params(), Regime.from_dict(PAPER_LIKE))
    with pytest.raises(ConfigError, match=r"unknown setting for SGD 'betas'"):
        apply_settings(opt, {"lr": 5.0, "betas": (0.9, 0.99)})
    assert opt.param_groups[0]["lr"] == 0.1


def test_apply_settings_fills_a_tensor_lr_in_place():
    lr = torch.tensor(0.1)
    opt = torch.optim.SGD(_params(), lr=lr, momentum=0.9)
    apply_settings(opt, {"lr": 0.05, "momentum": 0.5})
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)
    assert opt.param_groups[0]["momentum"] == 0.5


# -- per-group semantics --------------------------------------------------------------------------
def _two_groups(**bn_group):
    a, bn = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    return torch.optim.SGD([{"params": [a]}, {"params": [bn], **bn_group}], lr=0.1,
                           momentum=0.9, weight_decay=5e-4)


def test_apply_settings_keeps_a_groups_own_lr_and_zero_weight_decay():
    # Issue 14's bug: both groups came out as (0.1, 5e-4), the BN group's choices silently lost.
    r = Regime.from_dict({"epochs": 2, "phases": [
        {"epoch": 0, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        {"epoch": 1, "lr": 0.02, "weight_decay": 1e-3}]})
    opt = _two_groups(weight_decay=0.0, lr=0.01)
    apply_settings(opt, r.settings_at(0.0))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == \
        [(0.1, 5e-4), (pytest.approx(0.01), 0.0)]
    apply_settings(opt, r.settings_at(1.0))
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == \
        [(0.02, 1e-3), (pytest.approx(0.002), 0.0)]  # the BN group follows 1/10 of the lr


def test_a_regime_value_of_zero_does_not_lose_the_ratio():
    # weight decay off for a phase, then back on: the half-decay group comes back at half.
    opt = _two_groups(weight_decay=2.5e-4)
    for wd, expected in ((5e-4, 2.5e-4), (0.0, 0.0), (1e-3, 5e-4)):
        apply_settings(opt, {"lr": 0.0 if wd == 0 else 0.1, "weight_decay": wd})
        assert opt.param_groups[1]["weight_decay"] == pytest.approx(expected)
        assert opt.param_groups[0]["weight_decay"] == wd
    assert opt.param_groups[1][SCALE_KEY] == {"lr": 1.0, "weight_decay": 0.5}


def test_a_group_that_is_no_multiple_of_the_default_keeps_its_value():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "weight_decay": 1e-4,
                                             "nesterov": True}], lr=0.1, momentum=0.9)
    apply_settings(opt, {"lr": 0.2, "weight_decay": 3e-4, "nesterov": False})
    assert [(g["lr"], g["weight_decay"], g["nesterov"]) for g in opt.param_groups] == \
        [(0.2, 3e-4, False), (0.2, 1e-4, True)]


def test_the_ratio_travels_with_the_optimizer_state_dict():
    opt = _two_groups(lr=0.05)
    apply_settings(opt, {"lr": 0.4})
    fresh = _two_groups(lr=0.05)
    fresh.load_state_dict(opt.state_dict())
    apply_settings(fresh, {"lr": 0.8})  # the fresh defaults (0.1) would give a ratio of 2 here
    assert [g["lr"] for g in fresh.param_groups] == [0.8, pytest.approx(0.4)]


def test_one_group_equal_to_the_defaults_gets_the_settings_exactly():
    # The engine's optimizer: every value must be the regime's own float, bit for bit.
    r = Regime.from_dict(paper_like(schedule="cosine", warmup_epochs=1.0))
    opt = build_optimizer(_params(), r)
    for step in range(50):
        settings = r.settings_at(step / 10)
        apply_settings(opt, settings)
        assert {k: opt.param_groups[0][k] for k in settings} == settings


def test_an_only_group_follows_the_regime_even_after_a_foreign_change():
    # A checkpoint from before the ratios existed (the engine's, at lr 0.01 in phase 2) loaded into
    # a fresh optimizer: its lr differs from the defaults but is no choice of the user's.
    r = Regime.from_dict(PAPER_LIKE)
    opt = build_optimizer(_params(), r)
    opt.param_groups[0]["lr"] = 0.01
    apply_settings(opt, r.settings_at(4.5))
    assert opt.param_groups[0]["lr"] == 0.001
