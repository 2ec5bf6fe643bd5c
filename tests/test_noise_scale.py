"""Gradient noise scale: unbiased two-batch estimators, the online EMA, the one-shot estimate."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from bigbatch.diagnostics import (
    GradientNoiseScale,
    estimate_noise_scale,
    squared_grad_norm,
    two_batch_estimates,
)

# -- unbiasedness on linear regression with known G and Sigma -------------------------------------
# y = x . w* + eps, x ~ N(0, I_p), eps ~ N(0, s^2), loss = (x . w - y)^2 / 2. At w = w* + d the
# per-example gradient is g = x (x . d - eps), so G = E[x x^T] d = d and, by Isserlis' theorem,
# E[g g^T] = |d|^2 I + 2 d d^T + s^2 I: tr(Sigma) = tr E[g g^T] - |G|^2 = (p + 1)|d|^2 + p s^2.
P, NOISE_STD = 5, 0.7
D = torch.tensor([0.3, -0.2, 0.5, 0.1, 0.0], dtype=torch.float64)
TRUE_GRAD_SQ = float(D @ D)
TRUE_TRACE = (P + 1) * TRUE_GRAD_SQ + P * NOISE_STD**2


def _regression_norms(trials: int, big: int, small: int, seed: int = 0):
    """``|g_s|^2`` (mean over the small batches) and ``|g_b|^2`` of independent batches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(trials, big, P, generator=g, dtype=torch.float64)
    eps = NOISE_STD * torch.randn(trials, big, generator=g, dtype=torch.float64)
    per_example = x * (x @ D - eps).unsqueeze(-1)  # (trials, big, P), analytic gradients
    small_means = per_example.reshape(trials, big // small, small, P).mean(2)
    small_sq = small_means.square().sum(-1).mean(-1)
    big_sq = per_example.mean(1).square().sum(-1)
    return small_sq.tolist(), big_sq.tolist()


def _mean_and_stderr(values):
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(t.numel()))


@pytest.mark.parametrize(("big", "small"), [(32, 4), (16, 1), (12, 6)])
def test_two_batch_estimates_are_unbiased(big, small):
    small_sq, big_sq = _regression_norms(4000, big, small)
    grad_sq, trace = zip(*(two_batch_estimates(s, small, b, big)
                           for s, b in zip(small_sq, big_sq, strict=True)), strict=True)
    # 4 standard errors of the mean of 4000 independent estimates: fails by chance ~1 in 15000.
    mean, se = _mean_and_stderr(grad_sq)
    assert abs(mean - TRUE_GRAD_SQ) < 4 * se
    mean, se = _mean_and_stderr(trace)
    assert abs(mean - TRUE_TRACE) < 4 * se
    # negative control: the big batch's own squared norm is a biased |G|^2 (by tr(Sigma) / B_b)
    mean, se = _mean_and_stderr(big_sq)
    assert abs(mean - TRUE_GRAD_SQ) > 4 * se
    assert mean == pytest.approx(TRUE_GRAD_SQ + TRUE_TRACE / big, abs=4 * se)


def test_b_simple_is_the_ratio_of_the_averages():
    small_sq, big_sq = _regression_norms(4000, 32, 4, seed=1)
    gns = GradientNoiseScale(decay=1.0)
    for s, b in zip(small_sq, big_sq, strict=True):
        gns.update(s, 4, b, 32)
    est = [two_batch_estimates(s, 4, b, 32) for s, b in zip(small_sq, big_sq, strict=True)]
    g2 = torch.tensor([e[0] for e in est], dtype=torch.float64)
    tr = torch.tensor([e[1] for e in est], dtype=torch.float64)
    assert gns.grad_sq_norm == pytest.approx(float(g2.mean()), rel=1e-9)
    assert gns.trace_sigma == pytest.approx(float(tr.mean()), rel=1e-9)
    assert gns.b_simple == pytest.approx(gns.trace_sigma / gns.grad_sq_norm, rel=1e-12)
    # The delta method's standard error of a ratio of means R = mean(tr) / mean(g2).
    truth = TRUE_TRACE / TRUE_GRAD_SQ
    r = gns.b_simple
    se = float((tr - r * g2).std() / g2.mean()) / math.sqrt(g2.numel())
    assert abs(r - truth) < 4 * se
    # negative control: single-update ratios (|G|^2 often <= 0) average to nonsense
    ratios = tr / g2
    assert (g2 <= 0).any() and abs(float(ratios.mean()) - truth) > 4 * se


# -- the online estimator -------------------------------------------------------------------------
def test_ema_is_bias_corrected():
    gns = GradientNoiseScale(decay=0.5)
    gns.update(3.0, 1, 1.2, 10)  # |G|^2 = 1, tr = 2
    assert (gns.grad_sq_norm, gns.trace_sigma, gns.b_simple) == (1.0, 2.0, 2.0)  # not 0.5, 1.0
    gns.update(5.0, 1, 3.2, 10)  # |G|^2 = 3, tr = 2
    # weights 0.5 * 0.5 and 0.5, divided by 1 - 0.5**2
    assert gns.grad_sq_norm == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    assert gns.trace_sigma == pytest.approx(2.0)
    assert gns.num_updates == 2


@given(decay=st.floats(0, 1), small_sq=st.floats(1.0, 100.0), n=st.integers(1, 30))
def test_constant_measurements_give_that_value_for_any_decay(decay, small_sq, n):
    gns = GradientNoiseScale(decay=decay)
    for _ in range(n):
        gns.update(small_sq, 2, 0.5, 8)
    grad_sq, trace = two_batch_estimates(small_sq, 2, 0.5, 8)
    assert gns.grad_sq_norm == pytest.approx(grad_sq, rel=1e-9, abs=1e-12)
    assert gns.trace_sigma == pytest.approx(trace, rel=1e-9, abs=1e-12)


def test_before_any_update_and_with_negative_grad_sq():
    gns = GradientNoiseScale()
    assert math.isnan(gns.b_simple) and math.isnan(gns.grad_sq_norm)
    assert gns.gain(1024, 128) == 1.0
    gns.update(1.0, 1, 0.9, 2)  # |G|^2 = 0.8, fine
    gns2 = GradientNoiseScale()
    gns2.update(1.0, 1, 0.4, 2)  # |G|^2 = -0.2: B_simple undefined, not negative
    assert gns2.grad_sq_norm < 0 and math.isnan(gns2.b_simple)
    assert gns2.gain(1024, 128) == 1024 / 128  # all noise as far as we know


def _feed(gns: GradientNoiseScale, steps: range) -> None:
    for i in steps:
        gns.update(2.0 + math.sin(i), 4, 0.5 + 0.1 * math.cos(i), 64)


def test_resume_restores_every_running_average_exactly():
    uninterrupted = GradientNoiseScale(decay=0.9)
    _feed(uninterrupted, range(20))
    first = GradientNoiseScale(decay=0.9)
    _feed(first, range(10))
    buffer = io.BytesIO()
    torch.save({"noise_scale": first.state_dict()}, buffer)
    buffer.seek(0)
    resumed = GradientNoiseScale(decay=0.9)
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["noise_scale"])
    _feed(resumed, range(10, 20))
    assert resumed.state_dict() == uninterrupted.state_dict()  # bit for bit
    # negative control: without the checkpoint the last 10 updates alone give other values
    fresh = GradientNoiseScale(decay=0.9)
    _feed(fresh, range(10, 20))
    assert fresh.grad_sq_norm != uninterrupted.grad_sq_norm


def test_errors():
    with pytest.raises(ValueError, match=r"decay must be a number in \[0, 1\], got 1.5"):
        GradientNoiseScale(decay=1.5)
    with pytest.raises(ValueError, match=r"big_batch_size \(8\) must exceed small_batch_size \(8"):
        two_batch_estimates(1.0, 8, 1.0, 8)
    with pytest.raises(ValueError, match="small_batch_size must be a finite number > 0, got 0"):
        two_batch_estimates(1.0, 0, 1.0, 8)
    with pytest.raises(ValueError, match="squared norms must be finite"):
        GradientNoiseScale().update(float("inf"), 1, 1.0, 8)
    gns = GradientNoiseScale(decay=0.9)
    with pytest.raises(ValueError, match="missing \\['decay', 'grad_sq'"):
        gns.load_state_dict({})
    with pytest.raises(ValueError, match="decay is 0.99, this run's is 0.9"):
        gns.load_state_dict(GradientNoiseScale(decay=0.99).state_dict())


# -- squared_grad_norm ----------------------------------------------------------------------------
def test_squared_grad_norm_matches_a_flat_vector():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(5, 4)).sum().backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(squared_grad_norm(model.parameters())) == pytest.approx(float(flat @ flat))
    model[2].bias.grad = None  # skipped, not an error
    flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert float(squared_grad_norm(model.parameters())) == pytest.approx(float(flat @ flat))
    assert float(squared_grad_norm([])) == 0.0


def test_squared_grad_norm_of_mixed_dtypes_sums_in_float32():
    a = nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))
    b = nn.Parameter(torch.zeros(3))
    a.grad = torch.full((300,), 1.01, dtype=torch.bfloat16)
    b.grad = torch.tensor([1.0, 2.0, 2.0])
    out = squared_grad_norm([a, b])
    assert out.dtype == torch.float32
    expected = 300 * float(a.grad[0].float()) ** 2 + 9.0
    assert float(out) == pytest.approx(expected, rel=1e-6)
    # negative control: summed in bf16 the same squares are visibly off
    assert float(a.grad.square().sum()) + 9.0 != pytest.approx(expected, rel=1e-3)
    c = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    c.grad = torch.tensor([1e-9], dtype=torch.float64)
    assert squared_grad_norm([b, c]).dtype == torch.float64  # float64 is not rounded to float32


# -- estimate_noise_scale against per-example gradients (torch.func) ------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=torch.float64)
    return x, x[:, :3].argmax(1)  # learnable labels: the true gradient is far from 0 at init


def _per_example_grads(model: nn.Module, x, y) -> torch.Tensor:
    """(n, num_params) per-example gradients from torch.func, one flat row per example."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[k].flatten(1) for k in params], dim=1)


def test_with_examples_one_at_a_time_it_is_the_sample_covariance():
    """B_s = 1: tr(Sigma) = sum |g_i - mean|^2 / (B - 1), |G|^2 = |mean|^2 - tr(Sigma) / B."""
    model = _mlp()
    x, y = _data(64, seed=3)
    g = _per_example_grads(model, x, y)
    trace = float(torch.cov(g.T).trace())  # an unbiased sample covariance, independent code
    grad_sq = float(g.mean(0) @ g.mean(0)) - trace / 64
    est = estimate_noise_scale(model, nn.functional.cross_entropy, [(x, y)], 1)
    assert est.trace_sigma == pytest.approx(trace, rel=1e-10)
    assert est.grad_sq_norm == pytest.approx(grad_sq, rel=1e-10)
    assert est.b_simple == pytest.approx(trace / grad_sq, rel=1e-10)
    assert (est.num_batches, est.small_batch_size, est.big_batch_size) == (1, 1, 64)


def test_small_batches_of_four_over_two_batches():
    model = _mlp()
    batches = [_data(32, seed=4), _data(32, seed=5)]
    per_batch = []
    for x, y in batches:
        g = _per_example_grads(model, x, y)
        small_means = g.reshape(8, 4, -1).mean(1)
        small_sq = float(small_means.square().sum(1).mean())
        big_sq = float(g.mean(0).square().sum())
        per_batch.append(((32 * big_sq - 4 * small_sq) / 28,
                          (small_sq - big_sq) / (1 / 4 - 1 / 32)))
    grad_sq = sum(p[0] for p in per_batch) / 2
    trace = sum(p[1] for p in per_batch) / 2
    est = estimate_noise_scale(model, nn.functional.cross_entropy, batches, 4)
    assert (est.grad_sq_norm, est.trace_sigma) == pytest.approx((grad_sq, trace), rel=1e-10)
    assert est.b_simple == pytest.approx(trace / grad_sq, rel=1e-10)  # ratio of the means


def test_leaves_parameters_grads_and_bn_statistics_unchanged():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model(torch.randn(16, 6)).sum().backward()  # a .grad the caller still owns
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    est = estimate_noise_scale(model, nn.functional.cross_entropy, [(x, y)], 8)
    assert math.isfinite(est.trace_sigma) and est.trace_sigma > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN buffers
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert model.training
    # negative control: the same forward passes without the restore do move the running mean
    model(x[:8])
    assert not torch.equal(before["1.running_mean"], model.state_dict()["1.running_mean"])


@pytest.mark.parametrize(("batches", "small", "match"), [
    ([], 4, "batches is empty"),
    ([_data(30, 0)], 4, "batch 0 has 30 examples, which small_batch_size=4 does not split"),
    ([_data(8, 0)], 8, "into 2 or more equal small batches"),
    ([_data(8, 0)], 0, "small_batch_size must be an integer >= 1, got 0"),
    ([(torch.zeros(8, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.long))], 2,
     "batch 0: 8 inputs but 6 targets"),
])
def test_estimate_errors(batches, small, match):
    with pytest.raises(ValueError, match=match):
        estimate_noise_scale(_mlp(), nn.functional.cross_entropy, batches, small)
