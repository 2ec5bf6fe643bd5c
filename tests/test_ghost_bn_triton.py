"""The Triton kernels of ghost batch norm equal the chunked reference (tests/reference.py).

Without a GPU they run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), which executes each program in turn with numpy: shapes stay tiny (a few
programs per launch) and the whole file takes well under a minute on two cores. With a GPU the
same tests run on CUDA. They skip when triton is not importable.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from reference import CASES, assert_same_step, make_input, make_pair

pytest.importorskip("triton")

from bigbatch.layers import _triton_kernel, backend, backend_for, ghost_batch_norm  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=5e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=4e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}
FORMATS = {"2d": torch.channels_last, "3d": torch.channels_last_3d}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """Every call here asks for Triton, and no launch may fail: a failed one falls back to the
    PyTorch ops, whose results would pass the comparisons and hide the kernel's error."""
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", "triton")
    monkeypatch.setattr(backend, "_failed", {})
    monkeypatch.setattr(backend, "_warned", set())
    yield
    assert not backend._failed, backend._failed


@pytest.fixture
def launches(monkeypatch):
    """Counts the Triton forward and backward launches, so a test knows the kernels ran."""
    counts = {"forward": 0, "backward": 0}
    for name in counts:
        original = getattr(_triton_kernel, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(_triton_kernel, name, counted)
    return counts


def test_backend_is_triton():
    assert backend_for(torch.ones(4, 3, device=DEVICE)) == ("triton", "")


@settings(max_examples=8)
@given(
    case=st.sampled_from(sorted(CASES)),
    batch=st.integers(2, 13),
    num_features=st.integers(1, 3),
    ghost_batch_size=st.integers(2, 5),
    momentum=st.sampled_from([0.1, 1.0, None]),
    affine=st.booleans(),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(
    case, batch, num_features, ghost_batch_size, momentum, affine, channels_last, dtype, seed
):
    """Shapes, ghost sizes with and without a remainder, momentum settings, both layouts."""
    assume(batch > ghost_batch_size)  # else plain F.batch_norm runs, no kernel
    values_per_sample = torch.Size(CASES[case][2]).numel()
    last = batch - (batch - 1) // ghost_batch_size * ghost_batch_size
    assume(last * values_per_sample > 1)
    ghost, ref = make_pair(
        case, num_features, ghost_batch_size, dtype, DEVICE, momentum=momentum, affine=affine
    )
    torch.manual_seed(seed)
    fmt = FORMATS.get(case) if channels_last else None
    for _ in range(2):
        ghost.zero_grad()
        ref.zero_grad()
        x = make_input(case, batch, num_features, dtype, DEVICE, memory_format=fmt)
        if dtype == torch.float32:  # as in test_ghost_bn.py: an ill-conditioned ghost batch
            assume(min(float(c.detach().std()) for c in x.split(ghost_batch_size)) > 0.05)
        assert_same_step(ghost, ref, x, tol=TOL[dtype])
        if fmt is not None:
            assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["1d", "2d"])
def test_reduced_precision(case, dtype, launches):
    """float16/bfloat16 input: output and input gradient in that dtype, statistics in float32."""
    ghost, ref = make_pair(case, 3, 4, torch.float32, DEVICE)
    fmt = torch.channels_last if case == "2d" else None
    x = make_input(case, 10, 3, dtype, DEVICE, memory_format=fmt)
    assert_same_step(ghost, ref, x, tol=TOL[dtype], ref_dtype=torch.float32)
    assert x.grad.dtype == dtype and ghost.running_mean.dtype == torch.float32
    assert launches == {"forward": 1, "backward": 1}


@pytest.mark.parametrize("split", [False, True])
def test_tiles_channel_blocks_and_splits(monkeypatch, launches, split):
    """Values per ghost batch over one tile (Chan's merge across tiles), channels over one block
    (masked channel tails), in both layouts; with ``split`` the GPU is taken to have many SMs, so
    each ghost batch is cut into chunks (two launches per direction, partials merged in order),
    the shorter last ghost batch leaving some chunks empty."""
    if split:
        monkeypatch.setattr(_triton_kernel, "_sm_count", lambda device: 64)
    for shape, fmt, g in (((20, 3, 40, 30), None, 12), ((7, 70, 8, 8), torch.channels_last, 4)):
        values = g * shape[2] * shape[3]
        block_m, block_c, _ = _triton_kernel.blocks(shape[1], values, fmt is not None)
        units = -(-shape[0] // g) * -(-shape[1] // block_c)
        chunks, _ = _triton_kernel.splits(units, values, block_m, DEVICE)
        assert (chunks > 1) == split and (values > block_m or shape[1] > block_c)
        ghost, ref = make_pair("2d", shape[1], g, torch.float64, DEVICE)
        x = torch.randn(*shape, dtype=torch.float64, device=DEVICE) * 2 + 5
        x = x.contiguous(memory_format=fmt or torch.contiguous_format).requires_grad_()
        assert_same_step(ghost, ref, x, tol=TOL[torch.float64])
    assert launches == {"forward": 2, "backward": 2}


def test_large_mean_stays_accurate():
    """No E[x^2] - E[x]^2: float32 statistics stay exact when |mean| >> std."""
    ghost, ref = make_pair("1d", 4, 8, torch.float32, DEVICE)
    x = (torch.randn(32, 4, device=DEVICE) + 1000.0).requires_grad_()
    assert_same_step(ghost, ref, x, tol=dict(rtol=1e-3, atol=2e-3))


@pytest.mark.parametrize("wrt", ["input", "parameters"])
def test_gradcheck(wrt):
    """float64 through the interpreter: first and second derivatives (the latter by
    recomputation), the input alone and the parameters alone; ghost batches of 3 and 2."""
    x = torch.randn(5, 2, dtype=torch.float64, device=DEVICE) * 2 + 1
    weight = torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5
    bias = torch.randn(2, dtype=torch.float64, device=DEVICE)
    x.requires_grad_(wrt == "input")
    weight.requires_grad_(wrt == "parameters")
    bias.requires_grad_(wrt == "parameters")

    def fn(x, weight, bias):
        return ghost_batch_norm(x, None, None, weight, bias, ghost_batch_size=3, training=True)

    torch.autograd.gradcheck(fn, (x, weight, bias))
    torch.autograd.gradgradcheck(fn, (x, weight, bias))


@pytest.mark.parametrize("ghost_batch_size", [1, 3])
def test_empty_batch(ghost_batch_size):
    ghost, ref = make_pair("2d", 3, ghost_batch_size, torch.float32, DEVICE)
    x = make_input("2d", 0, 3, torch.float32, DEVICE)
    assert_same_step(ghost, ref, x, tol=TOL[torch.float32])


@pytest.mark.parametrize(
    "momentum, memory_format, dtype",
    [(0.1, None, torch.float32), (None, torch.channels_last, torch.float32),
     (0.1, torch.channels_last, torch.bfloat16)],
)  # fmt: skip
def test_compile_fullgraph(momentum, memory_format, dtype, launches):
    """torch.compile calls the custom op (no graph break) and gets the reference's gradients; the
    fake implementation's strides and dtypes match the kernel's (channels_last, bfloat16)."""
    torch._dynamo.reset()  # a graph traced before the switch was set would be reused (backend.py)
    ghost, ref = make_pair("2d", 3, 4, torch.float32, DEVICE, momentum=momentum)
    compiled = torch.compile(ghost, fullgraph=True, backend="aot_eager")
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else None
    for batch in (10, 4):  # a remainder ghost batch, then the single-ghost-batch fast path
        ghost.zero_grad()
        ref.zero_grad()
        x = make_input("2d", batch, 3, dtype, DEVICE, memory_format=memory_format)
        assert_same_step(ghost, ref, x, tol=TOL[dtype], call=compiled, ref_dtype=ref_dtype)
        if memory_format is not None:
            assert x.grad.is_contiguous(memory_format=memory_format)
    assert launches == {"forward": 1, "backward": 1}


@pytest.mark.slow
def test_compile_inductor(launches):
    """The default backend (inductor) around the custom op: one small case, forward and backward."""
    torch._dynamo.reset()
    ghost, ref = make_pair("1d", 4, 4, torch.float32, DEVICE)
    x = make_input("1d", 10, 4, torch.float32, DEVICE)
    compiled = torch.compile(ghost, fullgraph=True)
    assert_same_step(ghost, ref, x, tol=TOL[torch.float32], call=compiled)
    assert launches == {"forward": 1, "backward": 1}


def test_failed_launch_falls_back_with_one_warning(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("out of shared memory (simulated)")

    monkeypatch.setattr(_triton_kernel, "forward", broken)
    ghost, ref = make_pair("1d", 3, 4, torch.float64, DEVICE)
    with caplog.at_level(logging.WARNING, logger="bigbatch.layers.backend"):
        assert_same_step(ghost, ref, make_input("1d", 10, 3, device=DEVICE), tol=TOL[
            torch.float64])  # fmt: skip
        ghost(make_input("1d", 10, 3, device=DEVICE))
    (record,) = caplog.records
    assert "Triton launch failed" in record.getMessage() and "simulated" in record.getMessage()
    choice = backend_for(torch.ones(4, 3, device=DEVICE))
    assert choice.name == "torch" and "out of shared memory" in choice.reason
    backend._failed.clear()  # expected here (the fixture refuses failed launches)


def test_missing_triton_falls_back_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_triton_import", "triton is not importable (simulated)")
    ghost, ref = make_pair("1d", 3, 4, torch.float64, DEVICE)
    with caplog.at_level(logging.WARNING, logger="bigbatch.layers.backend"):
        for _ in range(2):
            assert_same_step(ghost, ref, make_input("1d", 10, 3, device=DEVICE), tol=TOL[
                torch.float64])  # fmt: skip
    (record,) = caplog.records
    assert "falls back to the PyTorch ops: triton is not importable" in record.getMessage()
    assert backend_for(torch.ones(4, 3, device=DEVICE)).reason.startswith("triton is not")
