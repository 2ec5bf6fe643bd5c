"""LARS and LAMB: steps equal the papers' update rules computed by hand, regime lookup, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from bigbatch.errors import ConfigError
from bigbatch.recipes import Regime, apply_settings, build_optimizer
from bigbatch.recipes.optimizers import LAMB, LARS


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _params(w, b):
    weight = nn.Parameter(torch.tensor([w], dtype=torch.float64))  # a (1, n) matrix: adapted
    bias = nn.Parameter(torch.tensor(b, dtype=torch.float64))  # 1-d: excluded
    return weight, bias


def _set_grads(weight, bias, gw, gb):
    weight.grad = torch.tensor([gw], dtype=torch.float64)
    bias.grad = torch.tensor(gb, dtype=torch.float64)


# -- LARS: You, Gitman, Ginsburg 2017, Algorithm 1 ------------------------------------------------
def test_lars_first_step_by_hand():
    weight, bias = _params([3.0, 4.0], [1.0])
    opt = LARS([weight, bias], lr=2.0, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    _set_grads(weight, bias, [0.6, 0.8], [0.5])
    opt.step()
    # ||w|| = 5, ||g|| = 1: local_lr = 0.001 * 5 / (1 + 0.1 * 5) = 1/300;
    # v = 2 * (1/300) * (g + 0.1 w) = (1/150) * (0.9, 1.2) = (0.006, 0.008)
    assert weight[0].tolist() == pytest.approx([2.994, 3.992], rel=1e-12)
    assert bias.tolist() == pytest.approx([0.0])  # v = lr * g = 1: no trust ratio, no decay


def _lars_reference(w, g_seq, lr, m, wd, eta):
    """Plain-float LARS on one tensor, following Algorithm 1 line by line."""
    v = [0.0] * len(w)
    for g in g_seq:
        local_lr = eta * _norm(w) / (_norm(g) + wd * _norm(w))
        v = [m * vi + lr * local_lr * (gi + wd * wi) for vi, gi, wi in zip(v, g, w, strict=True)]
        w = [wi - vi for wi, vi in zip(w, v, strict=True)]
    return w


def test_lars_three_steps_with_momentum_equal_the_reference():
    grads = [[0.6, 0.8], [-1.0, 2.0], [0.3, 0.1]]
    weight, bias = _params([3.0, 4.0], [1.0])
    opt = LARS([weight, bias], lr=2.0, momentum=0.9, weight_decay=0.1)
    for g in grads:
        _set_grads(weight, bias, g, [0.5])
        opt.step()
    expected = _lars_reference([3.0, 4.0], grads, lr=2.0, m=0.9, wd=0.1, eta=0.001)
    assert weight[0].tolist() == pytest.approx(expected, rel=1e-12)
    # bias: v = 1, 1.9, 2.71; b = 1 - 1 - 1.9 - 2.71
    assert bias.item() == pytest.approx(1.0 - 1.0 - 1.9 - 2.71)


def test_lars_without_exclusion_adapts_the_bias_too():
    weight, bias = _params([3.0, 4.0], [2.0])
    opt = LARS([weight, bias], lr=2.0, momentum=0.0, weight_decay=0.1, exclude_1d=False)
    _set_grads(weight, bias, [0.6, 0.8], [0.5])
    opt.step()
    local_lr = 0.001 * 2.0 / (0.5 + 0.1 * 2.0)
    assert bias.item() == pytest.approx(2.0 - 2.0 * local_lr * (0.5 + 0.1 * 2.0))


def test_lars_zero_weights_use_a_local_lr_of_one():
    weight, bias = _params([0.0, 0.0], [0.0])
    opt = LARS([weight, bias], lr=0.5, momentum=0.0)
    _set_grads(weight, bias, [1.0, -2.0], [0.0])
    opt.step()
    assert weight[0].tolist() == pytest.approx([-0.5, 1.0])  # lr * g: local_lr = 1
    assert torch.isfinite(weight).all()


# -- LAMB: You et al. 2019, Algorithm 2 -----------------------------------------------------------
def _lamb_reference(w, g_seq, lr, b1, b2, eps, wd, adapt=True):
    """Plain-float LAMB on one tensor, following Algorithm 2 (bias-corrected, phi = identity)."""
    m, v = [0.0] * len(w), [0.0] * len(w)
    for t, g in enumerate(g_seq, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        r = [(mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + eps)
             for mi, vi in zip(m, v, strict=True)]
        if not adapt:
            w = [wi - lr * ri for wi, ri in zip(w, r, strict=True)]
            continue
        u = [ri + wd * wi for ri, wi in zip(r, w, strict=True)]
        ratio = _norm(w) / _norm(u)
        w = [wi - lr * ratio * ui for wi, ui in zip(w, u, strict=True)]
    return w


def test_lamb_first_step_by_hand():
    weight, bias = _params([3.0, 4.0], [1.0])
    opt = LAMB([weight, bias], lr=0.1, eps=1e-6, weight_decay=0.01)
    _set_grads(weight, bias, [0.6, -0.8], [0.5])
    opt.step()
    # bias-corrected m = g, v = g**2 at t = 1, so r = g / (|g| + eps), about sign(g)
    r = [0.6 / (0.6 + 1e-6), -0.8 / (0.8 + 1e-6)]
    u = [r[0] + 0.03, r[1] + 0.04]
    ratio = 5.0 / _norm(u)
    assert weight[0].tolist() == pytest.approx([3.0 - 0.1 * ratio * u[0],
                                                4.0 - 0.1 * ratio * u[1]], rel=1e-12)
    assert bias.item() == pytest.approx(1.0 - 0.1 * 0.5 / (0.5 + 1e-6), rel=1e-12)  # plain Adam


@pytest.mark.parametrize("exclude_1d", [True, False])
def test_lamb_four_steps_equal_the_reference(exclude_1d):
    grads = [[0.6, -0.8], [0.1, 0.3], [-2.0, 0.5], [0.0, 1.0]]
    bias_grads = [[0.5, -0.1], [0.2, 0.2], [-0.4, 0.0], [1.0, 3.0]]
    weight, bias = _params([3.0, 4.0], [1.0, -2.0])
    opt = LAMB([weight, bias], lr=0.05, betas=(0.8, 0.95), eps=1e-4, weight_decay=0.1,
               exclude_1d=exclude_1d)
    for g, gb in zip(grads, bias_grads, strict=True):
        _set_grads(weight, bias, g, gb)
        opt.step()
    kw = {"lr": 0.05, "b1": 0.8, "b2": 0.95, "eps": 1e-4}
    assert weight[0].tolist() == pytest.approx(
        _lamb_reference([3.0, 4.0], grads, wd=0.1, **kw), rel=1e-12)
    assert bias.tolist() == pytest.approx(_lamb_reference(
        [1.0, -2.0], bias_grads, wd=0.0 if exclude_1d else 0.1, adapt=not exclude_1d, **kw),
        rel=1e-12)


# -- common behaviour -----------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_resume_from_a_weights_only_checkpoint(cls):
    def run(opt_state=None, steps=range(6)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
        opt = cls(model.parameters(), lr=0.1)
        if opt_state is not None:
            model.load_state_dict(opt_state[0])
            opt.load_state_dict(opt_state[1])
        for i in steps:
            g = torch.Generator().manual_seed(i)
            model.zero_grad()
            model(torch.randn(8, 3, generator=g)).square().mean().backward()
            opt.step()
        return model, opt

    full, _ = run()
    half, opt = run(steps=range(3))
    buffer = io.BytesIO()
    torch.save((half.state_dict(), opt.state_dict()), buffer)
    buffer.seek(0)
    resumed, _ = run(torch.load(buffer, weights_only=True), steps=range(3, 6))
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    restarted, _ = run(steps=range(3, 6))  # negative control: a fresh optimizer differs
    assert not torch.equal(next(full.parameters()), next(restarted.parameters()))


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_skips_parameters_without_gradient_and_leaves_grads_alone(cls):
    weight, bias = _params([3.0, 4.0], [1.0])
    weight.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    opt = cls([weight, bias], lr=0.1)
    opt.step()
    assert bias.item() == 1.0 and weight.grad.tolist() == [[0.6, 0.8]]


@pytest.mark.parametrize(("make", "match"), [
    (lambda p: LARS(p, lr=-1.0), r"lr must be a number in \[0, inf\), got -1.0"),
    (lambda p: LARS(p, momentum=1.0), r"momentum must be a number in \[0, 1\), got 1.0"),
    (lambda p: LARS(p, trust_coefficient=0.0), r"trust_coefficient must be .* \(0, inf\)"),
    (lambda p: LAMB(p, betas=(0.9,)), r"betas must be a pair \(beta1, beta2\), got \(0.9,\)"),
    (lambda p: LAMB(p, betas=(0.9, 1.0)), r"betas\[1\] must be a number in \[0, 1\)"),
    (lambda p: LAMB(p, eps=0.0), r"eps must be a number in \(0, inf\), got 0.0"),
])
def test_bad_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make([nn.Parameter(torch.zeros(2))])


# -- by name in a regime --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "cls", "extra"), [
    ("LARS", LARS, {"momentum": 0.9, "trust_coefficient": 0.002}),
    ("LAMB", LAMB, {"betas": [0.9, 0.99]}),
])
def test_regime_builds_them_by_name(name, cls, extra):
    regime = Regime.from_dict({"optimizer": name, "epochs": 2,
                               "phases": [{"epoch": 0, "lr": 0.5, "weight_decay": 1e-4, **extra},
                                          {"epoch": 1, "lr": 0.05}]})
    model = nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), regime)
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.5
    apply_settings(opt, regime.settings_at(1.5))
    assert opt.param_groups[0]["lr"] == 0.05


def test_regime_rejects_a_misspelt_setting_and_suggests_names():
    with pytest.raises(ConfigError, match="trust_coefficient"):
        Regime.from_dict({"optimizer": "LARS", "epochs": 1,
                          "phases": [{"epoch": 0, "lr": 0.1, "trust_coeficient": 0.01}]})
    with pytest.raises(ConfigError, match="LARS"):
        Regime.from_dict({"optimizer": "LRS", "epochs": 1, "phases": [{"epoch": 0, "lr": 0.1}]})
