"""GhostBatchNorm equals nn.BatchNorm applied slice by slice (tests/reference.py); a drop-in BN."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import CASES, assert_same_step, make_input, make_pair
from torch import nn

from bigbatch.layers import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    _cpu_kernel,
    backend,
    convert_ghost_batchnorm,
    ghost_batch_norm,
    ghost_bn,
    revert_ghost_batchnorm,
)

# Ghost batch norm runs fused C kernels on CPU where they build (bigbatch/layers/_cpu_kernel.py),
# Triton kernels (here through Triton's interpreter, tests/test_ghost_bn_triton.py) and vectorised
# PyTorch ops elsewhere: all must match.
BACKENDS = {"kernel": contextlib.nullcontext, "torch ops": _cpu_kernel.disabled}
HAS_TRITON = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def _triton():
    """BIGBATCH_GBN_BACKEND=triton for a block (the interpreter runs it on CPU, see conftest)."""
    before = os.environ.get("BIGBATCH_GBN_BACKEND")
    os.environ["BIGBATCH_GBN_BACKEND"] = "triton"
    try:
        yield
    finally:
        if before is None:
            del os.environ["BIGBATCH_GBN_BACKEND"]
        else:
            os.environ["BIGBATCH_GBN_BACKEND"] = before
    # A failed launch falls back to the ops, which would pass the comparisons: refuse it.
    assert not backend._failed, backend._failed


# Every backend, Triton included when it imports (the gradchecks of the slow interpreter are in
# test_ghost_bn_triton.py).
ALL_BACKENDS = {**BACKENDS, **({"triton": _triton} if HAS_TRITON else {})}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}


@given(
    case=st.sampled_from(sorted(CASES)),
    batch=st.integers(2, 23),
    num_features=st.integers(1, 4),
    ghost_batch_size=st.integers(1, 9),
    momentum=st.sampled_from([0.1, 0.5, 1.0, 0.0, None]),
    affine=st.booleans(),
    track_running_stats=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    steps=st.integers(1, 3),
    backend=st.sampled_from(sorted(ALL_BACKENDS)),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(
    case,
    batch,
    num_features,
    ghost_batch_size,
    momentum,
    affine,
    track_running_stats,
    dtype,
    steps,
    backend,
    seed,
):
    values_per_sample = 1
    for size in CASES[case][2]:
        values_per_sample *= size
    last = batch - (batch - 1) // ghost_batch_size * ghost_batch_size
    assume(last * values_per_sample > 1)  # the refused case has its own test
    ghost, ref = make_pair(
        case,
        num_features,
        ghost_batch_size,
        dtype,
        momentum=momentum,
        affine=affine,
        track_running_stats=track_running_stats,
    )
    torch.manual_seed(seed)  # the inputs are part of the example: a failure replays exactly
    with ALL_BACKENDS[backend]():
        for _ in range(steps):
            ghost.zero_grad()
            ref.zero_grad()
            x = make_input(case, batch, num_features, dtype)
            if dtype == torch.float32:
                # A ghost batch whose values nearly coincide is ill-conditioned: the float32
                # reference (nn.BatchNorm) then loses digits that the layer keeps (the CPU
                # kernel sums in double), so the two differ beyond TOL. The kernel is held to
                # float64 results in such cases in test_ghost_bn_kernel.py.
                assume(_min_ghost_std(x, ghost_batch_size) > 0.05)
            assert_same_step(ghost, ref, x, tol=TOL[dtype])
    ghost.eval()
    ref.eval()
    assert_same_step(ghost, ref, make_input(case, batch, num_features, dtype), tol=TOL[dtype])


def _min_ghost_std(x, ghost_batch_size):
    dims = [0] + list(range(2, x.dim()))
    return min(float(c.detach().std(dim=dims, unbiased=False).min()) for c in
               x.split(ghost_batch_size))  # fmt: skip


def test_counts_one_update_per_ghost_batch():
    ghost, ref = make_pair("2d", 3, 4, momentum=None)
    assert_same_step(ghost, ref, make_input("2d", 10, 3), tol=TOL[torch.float64])
    assert ghost.num_batches_tracked.item() == 3 + 3  # 10 samples -> ghost batches of 4, 4, 2


def test_differs_from_whole_batch_norm():
    """Negative control: ghost statistics are not the whole batch's."""
    ghost, _ = make_pair("2d", 3, 4)
    bn = nn.BatchNorm2d(3, dtype=torch.float64)
    bn.load_state_dict(ghost.state_dict())
    x = make_input("2d", 12, 3)
    assert not torch.allclose(ghost(x), bn(x))
    assert not torch.allclose(ghost.running_mean, bn.running_mean)


def test_one_ghost_batch_is_exactly_batch_norm():
    ghost, ref = make_pair("2d", 3, 16, dtype=torch.float32)
    x = make_input("2d", 16, 3, dtype=torch.float32)
    assert_same_step(ghost, ref, x, tol=dict(rtol=0, atol=0))


def test_large_mean_stays_accurate():
    """Two-pass variance: no cancellation when |mean| >> std (float32)."""
    ghost, ref = make_pair("1d", 8, 16, dtype=torch.float32)
    x = (torch.randn(64, 8) + 1000.0).requires_grad_()  # E[x^2]-E[x]^2 would lose ~5%
    assert_same_step(ghost, ref, x, tol=dict(rtol=1e-3, atol=2e-3))


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("case", ["1d", "2d"])
@pytest.mark.parametrize("wrt", ["input", "weight", "bias", "all"])
def test_gradcheck(case, wrt, backend):
    x = make_input(
        case, 7, 2
    )  # ghost batches 3, 3, 1 sample(s) with spatial positions: a remainder
    if case == "1d":
        x = make_input(case, 8, 2)  # ghost batches 3, 3, 2
    weight = torch.rand(2, dtype=torch.float64) + 0.5
    bias = torch.randn(2, dtype=torch.float64)
    for t, name in ((x, "input"), (weight, "weight"), (bias, "bias")):
        t.requires_grad_(wrt in (name, "all"))

    def fn(x, weight, bias):
        return ghost_batch_norm(
            x, None, None, weight, bias, ghost_batch_size=3, training=True, eps=1e-5
        )

    with BACKENDS[backend]():
        torch.autograd.gradcheck(fn, (x, weight, bias))
        torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_state_dict_round_trip_both_ways():
    for case, (ghost_cls, bn_cls, _) in CASES.items():
        bn = bn_cls(3)
        bn(make_input(case, 6, 3, torch.float32))  # non-trivial buffers
        ghost = ghost_cls(3, 4)
        assert ghost.state_dict().keys() == bn.state_dict().keys()
        ghost.load_state_dict(bn.state_dict())
        ghost(make_input(case, 6, 3, torch.float32))
        back = bn_cls(3)
        back.load_state_dict(ghost.state_dict())
        for key, value in ghost.state_dict().items():
            assert torch.equal(back.state_dict()[key], value)


def test_save_load_weights_only(tmp_path):
    ghost = GhostBatchNorm2d(3, 4)
    ghost(make_input("2d", 9, 3, torch.float32))
    buffer = io.BytesIO()
    torch.save(ghost.state_dict(), buffer)
    buffer.seek(0)
    loaded = GhostBatchNorm2d(3, 4)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    assert loaded.num_batches_tracked.item() == 3
    for key, value in ghost.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_module_basics():
    m = GhostBatchNorm2d(5, ghost_batch_size=32, momentum=None, dtype=torch.float64)
    assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    assert m.weight.dtype == torch.float64 and m.running_mean.dtype == torch.float64
    assert "ghost_batch_size=32" in repr(m) and "momentum=None" in repr(m)
    m = GhostBatchNorm1d(4, 2, bias=False)
    assert m.bias is None
    if ghost_bn._BN_TAKES_BIAS:  # else nn.BatchNorm has no bias=False to compare with
        ghost, ref = make_pair("1d", 4, 3, bias=False)
        assert_same_step(ghost, ref, make_input("1d", 8, 4), tol=TOL[torch.float64])


def test_bias_false_on_a_torch_without_the_bias_argument(torch_without_batchnorm_bias):
    """Older torch (2.11, seen on a GPU machine) has no ``bias=`` in _BatchNorm.__init__."""
    with_bias, without = GhostBatchNorm2d(3, 4), GhostBatchNorm2d(3, 4, bias=False)
    assert with_bias.bias is not None and without.bias is None
    assert "bias" not in without.state_dict() and "weight" in without.state_dict()
    without.reset_parameters()
    x = torch.randn(8, 3, 2, 2)
    torch.testing.assert_close(without(x), with_bias(x))  # bias 0 == no bias


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_channels_last(case):
    ghost, ref = make_pair(case, 4, 3, dtype=torch.float32)
    fmt = torch.channels_last if case == "2d" else torch.channels_last_3d
    x = make_input(case, 8, 4, torch.float32).detach().contiguous(memory_format=fmt)
    x.requires_grad_()
    assert_same_step(ghost, ref, x, tol=TOL[torch.float32])
    assert x.grad.is_contiguous(memory_format=fmt)
    assert ghost(x).is_contiguous(memory_format=fmt)


def test_non_contiguous_input_and_grad():
    ghost, ref = make_pair("1d_length", 3, 4)
    x = torch.randn(5, 10, 3, dtype=torch.float64).transpose(1, 2)  # (10, 3, 5), not contiguous
    x.requires_grad_()
    assert_same_step(ghost, ref, x, tol=TOL[torch.float64])
    x.grad = None
    ghost(x).sum().backward()  # an expanded (stride-0) gradient
    assert torch.isfinite(x.grad).all()


def test_autocast_bfloat16():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    ghost, ref = make_pair("2d", 4, 4, dtype=torch.float32)
    x = torch.randn(10, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y, y_ref = ghost(h), ref(h.detach())
    assert y.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    assert ghost.running_mean.dtype == torch.float32
    torch.testing.assert_close(ghost.running_mean, ref.bn.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ghost.running_var, ref.bn.running_var, rtol=1e-4, atol=1e-4)
    y.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 input stays float32, as for BN
        assert ghost(x.new_ones(10, 4, 2, 2).normal_()).dtype == torch.float32


@pytest.mark.parametrize("backend", sorted(ALL_BACKENDS))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_compile_fullgraph(momentum, backend):
    """Compiled: the traced ops (CPU backends) or the Triton custom op, no graph break; a random
    output gradient (assert_same_step) so that a wrong compiled backward cannot hide."""
    torch._dynamo.reset()  # retrace for this backend (see bigbatch/layers/backend.py)
    ghost, ref = make_pair("2d", 3, 4, dtype=torch.float32, momentum=momentum)
    compiled = torch.compile(ghost, fullgraph=True, backend="aot_eager")
    with ALL_BACKENDS[backend]():
        for batch in (10, 4):  # a remainder ghost batch, then the single-ghost-batch fast path
            ghost.zero_grad()
            ref.zero_grad()
            x = make_input("2d", batch, 3, torch.float32)
            assert_same_step(ghost, ref, x, tol=TOL[torch.float32], call=compiled)
            assert ghost.num_batches_tracked.item() == ref.bn.num_batches_tracked.item()


@pytest.mark.slow
def test_compile_inductor():
    """The default backend generates C++ (gcc): slower, so one small case, forward and backward."""
    start = time.perf_counter()
    ghost, ref = make_pair("1d", 4, 4, dtype=torch.float32)
    compiled = torch.compile(ghost, fullgraph=True)
    x = make_input("1d", 10, 4, torch.float32)
    assert_same_step(ghost, ref, x, tol=TOL[torch.float32], call=compiled)
    assert time.perf_counter() - start < 120


@pytest.mark.parametrize("bad", [0, -3, 1.5, "128", True, None])
def test_bad_ghost_batch_size(bad):
    with pytest.raises(ValueError, match=r"ghost_batch_size must be a positive int.*got"):
        GhostBatchNorm1d(4, ghost_batch_size=bad)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        ghost_batch_norm(torch.randn(4, 2), None, None, ghost_batch_size=bad, training=True)


def test_wrong_rank():
    with pytest.raises(ValueError, match=r"GhostBatchNorm2d expects 4-d input, got 3-d shape"):
        GhostBatchNorm2d(4)(torch.randn(8, 4, 5))
    with pytest.raises(ValueError, match=r"expects 2-d or 3-d input, got 4-d"):
        GhostBatchNorm1d(4)(torch.randn(8, 4, 5, 5))
    with pytest.raises(ValueError, match="expects input of shape"):
        GhostBatchNorm(4)(torch.randn(4))
    with pytest.raises(ValueError, match="add a batch dimension"):
        ghost_batch_norm(torch.randn(4), None, None, ghost_batch_size=2, training=True)


def test_single_value_per_channel():
    with pytest.raises(
        ValueError,
        match=r"a batch of 129 with ghost_batch_size=64 leaves a last ghost batch of 1 sample.*"
        r"use a ghost size that divides the batch",
    ):
        GhostBatchNorm1d(4, 64)(torch.randn(129, 4))
    with pytest.raises(ValueError, match=r"ghost_batch_size=1 gives ghost batches of 1 sample"):
        GhostBatchNorm1d(4, 1)(torch.randn(8, 4))
    with pytest.raises(ValueError, match=r"a batch of 1 sample"):
        GhostBatchNorm1d(4, 8)(torch.randn(1, 4))
    # With spatial positions a 1-sample ghost batch is fine (as for BN), and so is evaluation.
    GhostBatchNorm2d(4, 64)(torch.randn(129, 4, 2, 2))
    GhostBatchNorm1d(4, 64).eval()(torch.randn(129, 4))


def test_functional_errors_and_eval():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="training=False normalises with the running statistics"):
        ghost_batch_norm(x, None, None, ghost_batch_size=2, training=False)
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        ghost_batch_norm(
            x, torch.zeros(3), torch.ones(3), ghost_batch_size=2, training=True, momentum=None
        )
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    y = ghost_batch_norm(x, mean, var, ghost_batch_size=2, training=False)
    torch.testing.assert_close(y, F.batch_norm(x, mean, var, training=False))


def test_eval_without_running_stats_is_batch_norm():
    """track_running_stats=False: evaluation uses whole-batch statistics, as nn.BatchNorm does."""
    ghost = GhostBatchNorm1d(3, 4, track_running_stats=False).eval()
    bn = nn.BatchNorm1d(3, track_running_stats=False).eval()
    x = torch.randn(12, 3)
    torch.testing.assert_close(ghost(x), bn(x), rtol=0, atol=0)


def test_docstring_examples():
    import doctest

    import bigbatch.layers.backend
    import bigbatch.layers.convert
    import bigbatch.layers.ghost_bn

    for module in (bigbatch.layers.ghost_bn, bigbatch.layers.convert, bigbatch.layers.backend):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("backend", sorted(ALL_BACKENDS))
@pytest.mark.parametrize("ghost_batch_size", [1, 2, 5])
@pytest.mark.parametrize(
    "case, batch, momentum",
    [("1d", 0, 0.1), ("2d", 0, None), ("3d", 0, 0.1), ("1d_length", 11, 0.1)],
)
def test_empty_input_is_batch_norm(case, batch, momentum, ghost_batch_size, backend):
    """N = 0 (or no spatial values) at every ghost size: an empty output and gradient, unchanged
    running statistics and one count per (empty) slice, as nn.BatchNorm gives slice by slice."""
    ghost, ref = make_pair(case, 3, ghost_batch_size, momentum=momentum)
    x = make_input(case, batch, 3)
    if case == "1d_length":
        x = x.detach()[..., :0].requires_grad_()  # (11, 3, 0)
    with ALL_BACKENDS[backend]():
        assert_same_step(ghost, ref, x, tol=TOL[torch.float64])
    expected = 3 + (1 if batch == 0 else -(-batch // ghost_batch_size))
    assert ghost.num_batches_tracked.item() == expected


def test_jit_script_is_refused_with_what_works():
    model = convert_ghost_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 4)
    with pytest.raises(TypeError, match=r"torch.jit.script cannot compile GhostBatchNorm2d.*"
                       r"torch.export.export or torch.onnx.export"):  # fmt: skip
        torch.jit.script(model)
    torch.jit.script(revert_ghost_batchnorm(model).eval())  # the suggested eval-only copy works


def test_export_works():
    """torch.export, which the jit.script refusal points to, traces a converted model (eval)."""
    model = convert_ghost_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), 4)
    model.eval()
    x = torch.randn(8, 3, 2, 2)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


def test_lazy_batchnorm_is_converted_once_materialised():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(ValueError, match=r"cannot convert LazyBatchNorm2d.*run one batch"):
        convert_ghost_batchnorm(model, 4)
    model(torch.randn(8, 3, 2, 2))  # materialises: now an nn.BatchNorm2d with 4 features
    convert_ghost_batchnorm(model, 4)
    assert isinstance(model[1], GhostBatchNorm2d) and model[1].num_features == 4
