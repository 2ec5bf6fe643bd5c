"""The fused CPU kernels of ghost batch norm: built here, equal to the PyTorch ops, safe to lose."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from reference import ChunkedBatchNorm

from bigbatch.layers import GhostBatchNorm1d, _cpu_kernel, ghost_batch_norm

_BUILD_AND_RUN = """
import torch
from bigbatch.layers import _cpu_kernel, ghost_batch_norm
assert _cpu_kernel.available(), _cpu_kernel.status()
y = ghost_batch_norm(torch.randn(40, 3), None, None, ghost_batch_size=8, training=True)
print(float(y[:8].std(unbiased=False)))
"""
HAS_COMPILER = sys.platform.startswith("linux") and bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """Forget the loaded library for one test (restored after), with an empty cache directory."""
    monkeypatch.setattr(_cpu_kernel, "_lib", None)
    monkeypatch.setattr(_cpu_kernel, "_status", None)
    monkeypatch.setenv("BIGBATCH_CACHE_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernels are built on Linux with a C compiler")
def test_kernel_builds_and_is_used_here():
    """On this kind of machine (Linux, gcc) ghost batch norm must run the kernels, not fall back."""
    assert _cpu_kernel.available(), _cpu_kernel.status()
    assert _cpu_kernel.status().startswith("ghost batch norm CPU kernel: on")
    assert _cpu_kernel.usable(torch.ones(4, 3))
    assert not _cpu_kernel.usable(torch.ones(4, 3, dtype=torch.bfloat16))  # converted first
    with _cpu_kernel.disabled():
        assert not _cpu_kernel.usable(torch.ones(4, 3))


def test_build_is_cached_by_source_and_machine(fresh_loader):
    if not HAS_COMPILER:
        pytest.skip("needs a C compiler")
    lib, status = _cpu_kernel._load()
    assert lib is not None, status
    (built,) = fresh_loader.glob("ghost_bn_cpu-*.so")
    mtime = built.stat().st_mtime_ns
    lib2, _ = _cpu_kernel._load()  # a second process finds the same file and does not rebuild
    assert lib2 is not None
    assert [p.name for p in fresh_loader.iterdir()] == [built.name]  # no temporary left behind
    assert built.stat().st_mtime_ns == mtime


def test_failed_build_falls_back_with_one_warning(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="bigbatch.layers._cpu_kernel"):
        assert not _cpu_kernel.available()
        assert not _cpu_kernel.available()  # decided once per process
    assert "not built" in _cpu_kernel.status()
    warnings = [r for r in caplog.records if "could not be built" in r.getMessage()]
    assert len(warnings) == 1 and "BIGBATCH_GBN_BACKEND=torch" in warnings[0].getMessage()
    assert list(fresh_loader.glob("*.so")) == [] and list(fresh_loader.glob(".*tmp")) == []
    x = torch.randn(10, 3, requires_grad=True)
    with caplog.at_level(logging.WARNING):  # the fallback itself adds no second warning
        y = ghost_batch_norm(x, None, None, ghost_batch_size=4, training=True)  # still works
    assert len(caplog.records) == 1
    torch.testing.assert_close(y[:4], torch.nn.functional.batch_norm(x[:4], None, None, None,
                                                                      None, True))  # fmt: skip


def test_switched_off_by_environment(fresh_loader, monkeypatch):
    monkeypatch.setenv("BIGBATCH_CPU_KERNEL", "0")
    assert not _cpu_kernel.available()
    assert _cpu_kernel.status() == "ghost batch norm CPU kernel: off (BIGBATCH_CPU_KERNEL=0)"
    assert list(fresh_loader.iterdir()) == []


def _run(x, weight, bias, g, grad_out):
    x = x.detach().clone().requires_grad_()
    w = None if weight is None else weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    rm, rv = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
    y = ghost_batch_norm(x, rm, rv, w, b, ghost_batch_size=g, training=True, momentum=0.3)
    y.backward(grad_out)
    grads = [t.grad for t in (x, w, b) if t is not None]
    return [y, rm, rv, *grads]


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernels are built on Linux with a C compiler")
@given(
    rank=st.sampled_from([2, 3, 4, 5]),
    channels_last=st.booleans(),
    batch=st.integers(2, 40),
    channels=st.sampled_from([1, 3, 16, 17, 40]),
    ghost_batch_size=st.integers(2, 16),
    affine=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    threads=st.sampled_from([1, 2, 3]),
    offset=st.sampled_from([0.0, 5.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_kernel_equals_torch_ops(
    rank, channels_last, batch, channels, ghost_batch_size, affine, dtype, threads, offset, seed
):
    """Both layouts, remainders, odd channel counts, any thread count: the same numbers."""
    spatial = {2: (), 3: (5,), 4: (3, 4), 5: (2, 2, 3)}[rank]
    last = batch - (batch - 1) // ghost_batch_size * ghost_batch_size
    assume(last * math.prod(spatial) > 1)
    assume(batch > ghost_batch_size)  # one ghost batch is plain F.batch_norm, no kernel
    torch.manual_seed(seed)
    x = torch.randn(batch, channels, *spatial, dtype=dtype) * 2 + offset
    if channels_last and rank in (4, 5):
        fmt = torch.channels_last if rank == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    weight = torch.rand(channels, dtype=dtype) + 0.5 if affine else None
    bias = torch.randn(channels, dtype=dtype) if affine else None
    grad_out = torch.randn_like(x)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = _run(x, weight, bias, ghost_batch_size, grad_out)
        with _cpu_kernel.disabled():
            plain = _run(x, weight, bias, ghost_batch_size, grad_out)
    finally:
        torch.set_num_threads(before)
    if dtype == torch.float64:  # (both lose ~1e-12 * offset in tiny ghost batches)
        for a, b in zip(fused, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)
    else:
        # float32: compare the kernels with the float64 result of the same inputs. (The PyTorch
        # ops, like nn.BatchNorm, sum in float32 and compute x * scale + (b - mean * scale), which
        # loses digits of |x| when |mean| >> std and in small ill-conditioned ghost batches; they
        # are held to the chunked reference in test_ghost_bn.py. The kernels sum in double and
        # subtract the mean first.)
        def double(t):
            return None if t is None else t.double()

        exact = _run(double(x), double(weight), double(bias), ghost_batch_size, double(grad_out))
        for a, e in zip(fused, exact, strict=True):
            torch.testing.assert_close(a.double(), e, rtol=2e-4, atol=1e-4)
    if rank == 4 and channels_last:
        assert fused[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(not HAS_COMPILER, reason="the kernels are built on Linux with a C compiler")
@pytest.mark.parametrize("shape", [(300, 1100), (64, 600, 3), (40, 520, 2, 2)])
def test_kernel_wide_channel_blocks(shape):
    """More channels than one work unit holds (512), and a block narrower than the rest."""
    x = torch.randn(*shape, dtype=torch.float64)
    if len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x)
    weight, bias = torch.rand(shape[1], dtype=torch.float64), torch.randn(shape[1], dtype=x.dtype)
    fused = _run(x, weight, bias, 128, grad_out)
    with _cpu_kernel.disabled():
        plain = _run(x, weight, bias, 128, grad_out)
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_kernel_propagates_nan_like_batch_norm():
    """A NaN poisons its own ghost batch and channel only, as in nn.BatchNorm per slice."""
    x = torch.randn(8, 3)
    x[1, 2] = float("nan")
    y = ghost_batch_norm(x, None, None, ghost_batch_size=4, training=True)
    assert torch.isnan(y[:4, 2]).all()
    assert torch.isfinite(y[:, :2]).all() and torch.isfinite(y[4:]).all()


def test_kernel_is_not_used_under_compile_or_off_cpu():
    assert not _cpu_kernel.usable(torch.ones(4, 3, device="meta"))
    assert not _cpu_kernel.usable(torch.ones(4, 3, dtype=torch.float16))


@pytest.mark.parametrize("shape, fmt", [((12, 5), None), ((12, 5, 3, 3), torch.channels_last)])
def test_output_can_be_modified_in_place(shape, fmt):
    """The output is no view (autograd forbids in-place ops on a custom Function's view output):
    a model with ReLU(inplace=True) after the layer trains, as with nn.BatchNorm."""
    x = torch.randn(*shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    y = ghost_batch_norm(x, None, None, ghost_batch_size=4, training=True)
    y.relu_().sum().backward()
    with _cpu_kernel.disabled():
        x2 = x.detach().clone().requires_grad_()
        ghost_batch_norm(x2, None, None, ghost_batch_size=4, training=True).relu_().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.skipif(not HAS_COMPILER, reason="needs a C compiler")
def test_a_damaged_cached_library_is_rebuilt(fresh_loader):
    # Built by another process: truncating a library this process has mapped would crash it.
    env = {**os.environ, "BIGBATCH_CACHE_DIR": str(fresh_loader)}
    subprocess.run([sys.executable, "-c", _BUILD_AND_RUN], env=env, check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    (built,) = fresh_loader.glob("ghost_bn_cpu-*.so")
    built.write_bytes(b"\x7fELF truncated by a crash or by hand")
    lib, status = _cpu_kernel._load()
    assert lib is not None, status
    assert built.stat().st_size > 1000 and lib.gbn_abi_version() == _cpu_kernel._ABI_VERSION


def test_an_unusable_cache_directory_falls_back(fresh_loader, monkeypatch, caplog):
    blocker = fresh_loader / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("BIGBATCH_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="bigbatch.layers._cpu_kernel"):
        assert not _cpu_kernel.available()
    assert "not built" in _cpu_kernel.status() and "could not be built" in caplog.text


@pytest.mark.skipif(not HAS_COMPILER, reason="needs a C compiler")
def test_processes_building_at_once_share_one_library(fresh_loader):
    """Two processes (say two DDP ranks) start with an empty cache: both build and write the
    library at the same time; each build goes to its own temporary file, renamed atomically."""
    env = {**os.environ, "BIGBATCH_CACHE_DIR": str(fresh_loader)}
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD_AND_RUN], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert float(out) == pytest.approx(1.0, abs=1e-3)
    assert len(list(fresh_loader.glob("ghost_bn_cpu-*.so"))) == 1
    assert [p for p in fresh_loader.iterdir() if not p.name.endswith(".so")] == []


@pytest.mark.skipif(not HAS_COMPILER, reason="needs a C compiler")
def test_cc_may_hold_a_command_with_arguments(fresh_loader, monkeypatch):
    """CC="ccache gcc" or "gcc -m64" style values are split like a shell would."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{compiler} -fno-strict-aliasing")
    lib, status = _cpu_kernel._load()
    assert lib is not None, status


@pytest.mark.parametrize("backend", ["kernel", "torch ops"])
def test_empty_samples_are_handled_like_batch_norm(backend):
    """(N, C, 0) input: found crashing the kernel (it read a value that is not there)."""
    assert not _cpu_kernel.usable(torch.empty(300, 3, 0))
    ghost, bn = GhostBatchNorm1d(3, 128), torch.nn.BatchNorm1d(3)
    ref = ChunkedBatchNorm(bn, 128)
    x = torch.randn(300, 3, 0, requires_grad=True)
    ctx = _cpu_kernel.disabled() if backend == "torch ops" else contextlib.nullcontext()
    with ctx:
        y = ghost(x)
    y_ref = ref(x)
    assert y.shape == y_ref.shape == (300, 3, 0)
    for name, buf in ghost.named_buffers():
        torch.testing.assert_close(buf, getattr(bn, name))  # unchanged stats, 3 batches counted
    y.sum().backward()
