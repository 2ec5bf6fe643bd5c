"""Ghost batch norm on a CUDA GPU: the same contract as on CPU (skipped without a GPU).

Every test runs on each GPU backend: the Triton kernels (``BIGBATCH_GBN_BACKEND=triton``, skipped
without triton) and the PyTorch ops (``torch``). Run on a GPU machine with ``pytest -m gpu``
(``benchmarks/gpu_check.sh`` does); benchmarks/RESULTS.md records where it last ran.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from reference import assert_same_step, make_input, make_pair
from torch import nn

from bigbatch.layers import GhostBatchNorm2d, backend_for, convert_ghost_batchnorm

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=2e-2, atol=3e-2),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
}


@pytest.fixture(
    params=[
        pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs triton")),
        "torch",
    ]
)
def gpu_backend(request, monkeypatch):
    monkeypatch.setenv("BIGBATCH_GBN_BACKEND", request.param)
    assert backend_for(torch.ones(2, device=CUDA)).name == request.param
    return request.param


@pytest.mark.parametrize(
    "case, shape, ghost_batch_size, memory_format",
    [
        ("1d", (1000, 64), 128, None),  # remainder of 104
        ("1d_length", (300, 8, 5), 64, None),
        ("2d", (256, 16, 8, 8), 32, None),
        ("2d", (200, 16, 8, 8), 64, torch.channels_last),
        ("3d", (40, 8, 2, 4, 4), 16, torch.channels_last_3d),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_chunked_reference_on_cuda(
    gpu_backend, case, shape, ghost_batch_size, memory_format, dtype
):
    reduced = dtype in (torch.bfloat16, torch.float16)
    param_dtype = torch.float32 if reduced else dtype
    ghost, ref = make_pair(case, shape[1], ghost_batch_size, param_dtype, device=CUDA)
    for _ in range(2):
        ghost.zero_grad()
        ref.zero_grad()
        x = make_input(case, shape[0], shape[1], dtype, device=CUDA, memory_format=memory_format)
        ref_dtype = torch.float32 if reduced else None
        assert_same_step(ghost, ref, x, tol=TOL[dtype], ref_dtype=ref_dtype)
        if memory_format is not None:
            assert ghost(x).is_contiguous(memory_format=memory_format)
            assert x.grad.is_contiguous(memory_format=memory_format)


def test_empty_batch_on_cuda(gpu_backend):
    ghost, ref = make_pair("2d", 4, 1, torch.float32, device=CUDA)
    assert_same_step(ghost, ref, make_input("2d", 0, 4, torch.float32, device=CUDA), tol=TOL[
        torch.float32])  # fmt: skip


def test_bf16_autocast_on_cuda(gpu_backend):
    ghost, ref = make_pair("2d", 8, 16, torch.float32, device=CUDA)
    x = torch.randn(64, 8, 4, 4, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ghost(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert ghost.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("memory_format", [None, torch.channels_last])
def test_compile_on_cuda_matches_reference(gpu_backend, memory_format):
    torch._dynamo.reset()  # trace for this backend (see bigbatch/layers/backend.py)
    ghost, ref = make_pair("2d", 16, 32, torch.float32, device=CUDA)
    compiled = torch.compile(ghost, fullgraph=True)
    for batch in (128, 100):  # a remainder ghost batch the second time
        ghost.zero_grad()
        ref.zero_grad()
        x = make_input("2d", batch, 16, torch.float32, device=CUDA, memory_format=memory_format)
        assert_same_step(ghost, ref, x, tol=TOL[torch.float32], call=compiled)


def test_converted_model_trains_on_cuda(gpu_backend):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    ).to(CUDA)  # fmt: skip
    convert_ghost_batchnorm(model, ghost_batch_size=32)
    assert isinstance(model[1], GhostBatchNorm2d) and model[1].weight.device.type == "cuda"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, target = torch.randn(256, 3, 8, 8, device=CUDA), torch.randint(0, 10, (256,), device=CUDA)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
    assert int(model[1].num_batches_tracked) == 20 * 8
