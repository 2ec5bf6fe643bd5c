"""Weight distance from initialisation, log-spaced measurement points, log and sqrt fits."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from bigbatch.diagnostics import Fit, WeightDistance, fit_log, fit_sqrt, log_spaced_updates


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _reference_distance(model: nn.Module, w0: dict[str, torch.Tensor]) -> float:
    """||w - w0|| over one flat vector of every parameter: shares no code with WeightDistance."""
    flat = torch.cat([(p.detach().double() - w0[n].double()).flatten()
                      for n, p in model.named_parameters()])
    return math.sqrt(float(flat @ flat))


def _perturb(model: nn.Module, scale: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


# -- WeightDistance -------------------------------------------------------------------------------
def test_zero_at_initialisation():
    model = _model()
    total, per = WeightDistance(model)(model)
    assert total == 0.0
    assert per == {name: 0.0 for name, _ in model.named_parameters()}


def test_equals_hand_computed_norm_after_changes():
    model = _model()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    wd = WeightDistance(model)
    with torch.no_grad():
        model[0].bias.fill_(0.0)
        model[0].bias.add_(w0["0.bias"])
        model[0].bias[0] += 3.0
        model[0].bias[1] += 4.0  # this parameter moved by exactly 5
    total, per = wd(model)
    assert per["0.bias"] == pytest.approx(5.0)
    assert total == pytest.approx(5.0)
    _perturb(model)
    total, per = wd(model)
    assert total == pytest.approx(_reference_distance(model, w0), rel=1e-6)
    assert sum(v * v for v in per.values()) == pytest.approx(total**2, rel=1e-12)
    assert all(v > 0 for v in per.values())


def test_snapshot_is_a_detached_copy():
    model = _model()
    wd = WeightDistance(model)
    _perturb(model)
    assert all(not t.requires_grad for t in wd.state_dict().values())
    assert wd(model)[0] > 0  # the snapshot did not follow the in-place change


def test_state_dict_survives_a_weights_only_checkpoint():
    model = _model()
    wd = WeightDistance(model)
    _perturb(model)
    expected = wd(model)
    buffer = io.BytesIO()
    torch.save({"weight_distance": wd.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["weight_distance"]
    resumed = WeightDistance(model)  # a resumed run snapshots the *current* weights...
    assert resumed(model)[0] == 0.0  # (negative control: without the checkpoint w0 is wrong)
    resumed.load_state_dict(loaded)  # ...then restores the real w0
    assert resumed(model) == expected


def test_load_state_dict_rejects_another_model():
    wd = WeightDistance(_model())
    other = nn.Sequential(nn.Linear(4, 8))
    with pytest.raises(ValueError, match=r"missing \['1.bias', '1.weight', '3.bias', '3.w"):
        wd.load_state_dict(WeightDistance(other).state_dict())
    wrong_shape = {**wd.state_dict(), "0.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"parameter '0.bias' has shape \(7,\)"):
        wd.load_state_dict(wrong_shape)
    with pytest.raises(ValueError, match=r"the model does not match .*unexpected \['extra'\]"):
        model = _model()
        model.register_parameter("extra", nn.Parameter(torch.zeros(1)))
        wd(model)


class _GhostBN1d(nn.BatchNorm1d):
    """Stands in for a ghost-BN layer: a BatchNorm subclass keeps parameter names."""


def test_survives_ghost_bn_conversion_and_wrappers():
    model = _model()
    wd = WeightDistance(model)
    _perturb(model)
    expected = wd(model)
    bn = model[1]
    ghost = _GhostBN1d(8)
    ghost.weight, ghost.bias = bn.weight, bn.bias  # the converter reuses the same Parameters
    model[1] = ghost
    assert wd(model) == expected
    # nn.DataParallel names parameters "module.*" like DDP; both are unwrapped by type.
    assert wd(nn.DataParallel(model)) == expected
    wrapped = nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    assert wd(wrapped) == expected


def test_model_moved_after_the_snapshot():
    """Found on a GPU machine: nn.DataParallel moves the model to cuda:0 after the snapshot."""
    model = _model().double()
    wd = WeightDistance(model)
    _perturb(model)
    expected = wd(model)
    model.to("meta" if not torch.cuda.is_available() else "cuda")
    if torch.cuda.is_available():
        total, per = wd(model)
        assert total == pytest.approx(expected[0]) and per.keys() == expected[1].keys()
    else:  # a meta tensor has no values, but the snapshot must follow it without an error
        with pytest.raises(NotImplementedError):
            wd(model)
    assert {w.device.type for w in wd._w0.values()} == {"cuda" if torch.cuda.is_available()
                                                        else "meta"}


def test_with_the_real_ghost_bn_converter():
    convert = pytest.importorskip("bigbatch.layers.convert")
    model = _model()
    wd = WeightDistance(model)
    _perturb(model)
    expected = wd(model)
    converted = convert.convert_ghost_batchnorm(model, ghost_batch_size=4)
    assert wd(converted) == expected


def test_half_precision_parameters_are_measured_in_float32():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    wd = WeightDistance(model)
    with torch.no_grad():
        model.weight.mul_(1.01)  # a drift far below bf16 resolution of the difference's norm
    expected = _reference_distance(model, w0)
    assert wd(model)[0] == pytest.approx(expected, rel=1e-6)
    # negative control: the same norm accumulated in bf16 is visibly off
    bf16 = torch.linalg.vector_norm(model.weight.detach() - w0["weight"]).item()
    assert bf16 != pytest.approx(expected, rel=1e-6)


# -- log-spaced updates ---------------------------------------------------------------------------
def test_log_spaced_updates_examples():
    assert log_spaced_updates(1) == [1]
    assert log_spaced_updates(10, per_decade=8) == [1, 2, 3, 4, 6, 7, 10]
    assert log_spaced_updates(1000, per_decade=1) == [1, 10, 100, 1000]
    assert log_spaced_updates(150, per_decade=1) == [1, 10, 100, 150]


@given(max_updates=st.integers(1, 10**7), per_decade=st.integers(1, 20))
def test_log_spaced_updates_properties(max_updates, per_decade):
    points = log_spaced_updates(max_updates, per_decade)
    assert points[0] == 1 and points[-1] == max_updates
    assert points == sorted(set(points)) and all(isinstance(p, int) for p in points)
    assert len(points) <= per_decade * math.log10(max_updates) + 2
    # evenly spaced on a log axis: no gap wider than one step of 10**(1/per_decade); both ends of a
    # gap are rounded to integers, so a >= x - 1/2 and b <= x * step + 1/2
    step = 10 ** (1 / per_decade)
    assert all(b <= (a + 0.5) * step + 0.5 + 1e-9 for a, b in zip(points, points[1:], strict=False))


@pytest.mark.parametrize(("args", "match"), [((0,), "max_updates must be an integer >= 1, got 0"),
                                             ((10.0,), "max_updates must be an integer"),
                                             ((10, 0), "per_decade must be an integer >= 1")])
def test_log_spaced_updates_errors(args, match):
    with pytest.raises(ValueError, match=match):
        log_spaced_updates(*args)


# -- fits -----------------------------------------------------------------------------------------
def test_fit_log_recovers_a_and_b_from_noisy_data():
    rng = np.random.default_rng(0)
    t = np.array(log_spaced_updates(10_000, per_decade=8), dtype=float)
    d = 0.5 + 2.0 * np.log(t) + rng.normal(0, 0.05, t.size)
    fit = fit_log(t, d)
    assert fit.a == pytest.approx(0.5, abs=0.1)
    assert fit.b == pytest.approx(2.0, abs=0.02)
    assert fit.r2 > 0.999
    # negative control: the same data is worse explained by a free random walk
    assert fit_sqrt(t, d).r2 < fit.r2 - 0.05


def test_fit_sqrt_beats_fit_log_on_sqrt_data():
    t = np.array(log_spaced_updates(10_000), dtype=float)
    d = 1.0 + 0.3 * np.sqrt(t)
    sqrt_fit = fit_sqrt(t, d)
    assert (sqrt_fit.a, sqrt_fit.b) == pytest.approx((1.0, 0.3))
    assert sqrt_fit.r2 == pytest.approx(1.0)
    assert fit_log(t, d).r2 < 0.9


# Slopes are 0 (constant data, r2 defined as 1) or at least 1e-3 in size: with |b| near machine
# epsilon the data differ only by rounding, and no R^2 is meaningful (hypothesis found b=2.2e-16).
_SLOPES = st.just(0.0) | st.floats(-10, -1e-3) | st.floats(1e-3, 10)


@given(a=st.floats(-10, 10), b=_SLOPES,
       t=st.lists(st.integers(1, 10**6), min_size=2, max_size=30, unique=True))
def test_exact_data_is_fitted_exactly(a, b, t):
    t = np.array(t, dtype=float)
    for fit_fn, f in ((fit_log, np.log), (fit_sqrt, np.sqrt)):
        fit = fit_fn(t, a + b * f(t))
        assert (fit.a, fit.b) == pytest.approx((a, b), abs=1e-6)
        assert fit.r2 == pytest.approx(1.0, abs=1e-6)


def test_fit_is_a_tuple_with_predict():
    fit = fit_log([1, math.e, math.e**2], [1.0, 3.0, 5.0])
    a, b, r2 = fit
    assert isinstance(fit, Fit) and (a, b) == pytest.approx((1.0, 2.0))
    assert isinstance(fit.predict(math.e**3), float)
    assert fit.predict(math.e**3) == pytest.approx(7.0)
    np.testing.assert_allclose(fit.predict([1.0, math.e]), [1.0, 3.0])
    assert fit_sqrt([1, 4], [1.0, 2.0]).predict(9) == pytest.approx(3.0)
    assert fit_log([1, 2], [3.0, 3.0]).r2 == 1.0  # constant data: exact fit, not 0/0


@pytest.mark.parametrize(
    ("t", "d", "match"),
    [
        ([5, 5, 5], [1.0, 2.0, 3.0], "at least 2 distinct values of t, got 1"),
        ([5], [1.0], "at least 2 distinct values of t"),
        ([0, 1], [1.0, 2.0], r"t must be > 0"),
        ([1, 2], [1.0, float("nan")], "finite"),
        ([1, 2, 3], [1.0, 2.0], "same length"),
    ],
)
def test_fit_errors(t, d, match):
    for fit_fn in (fit_log, fit_sqrt):
        with pytest.raises(ValueError, match=match):
            fit_fn(t, d)
