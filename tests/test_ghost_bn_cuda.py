"""Ghost batch norm on a CUDA GPU: the same contract as on CPU (skipped without a GPU).

Run on a GPU machine with ``pytest -m gpu``; benchmarks/RESULTS.md records where it last ran.
"""

from __future__ import annotations

import pytest
import torch
from reference import ChunkedBatchNorm
from torch import nn

from bigbatch.layers import GhostBatchNorm1d, GhostBatchNorm2d, convert_ghost_batchnorm

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def _pair(ghost_cls, bn_cls, channels, ghost_batch_size, dtype=torch.float32):
    ghost = ghost_cls(channels, ghost_batch_size, device=CUDA, dtype=dtype)
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 1.5)
        ghost.bias.normal_()
    bn = bn_cls(channels, device=CUDA, dtype=dtype)
    bn.load_state_dict(ghost.state_dict())
    return ghost, ChunkedBatchNorm(bn, ghost_batch_size)


def _step(layer, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(grad_out)
    return y, x.grad


@pytest.mark.parametrize(
    "ghost_cls, bn_cls, shape, ghost_batch_size, channels_last",
    [
        (GhostBatchNorm1d, nn.BatchNorm1d, (1000, 64), 128, False),  # remainder of 104
        (GhostBatchNorm2d, nn.BatchNorm2d, (256, 16, 8, 8), 32, False),
        (GhostBatchNorm2d, nn.BatchNorm2d, (200, 16, 8, 8), 64, True),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_chunked_reference_on_cuda(
    ghost_cls, bn_cls, shape, ghost_batch_size, channels_last, dtype
):
    ghost, ref = _pair(ghost_cls, bn_cls, shape[1], ghost_batch_size, dtype)
    x = torch.randn(*shape, device=CUDA, dtype=dtype) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for _ in range(2):
        y, gx = _step(ghost, x, grad_out)
        y_ref, gx_ref = _step(ref, x, grad_out)
        torch.testing.assert_close(y, y_ref, **tol)
        torch.testing.assert_close(gx, gx_ref, **tol)
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
    for p, p_ref in zip(ghost.parameters(), ref.bn.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol)
    for name, buf in ghost.named_buffers():
        torch.testing.assert_close(buf, getattr(ref.bn, name), **tol)


def test_bf16_autocast_on_cuda():
    ghost, ref = _pair(GhostBatchNorm2d, nn.BatchNorm2d, 8, 16)
    x = torch.randn(64, 8, 4, 4, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = ghost(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert ghost.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), ref(x.bfloat16().float()), rtol=2e-2, atol=2e-2)


def test_compile_on_cuda_matches_eager():
    ghost, _ = _pair(GhostBatchNorm2d, nn.BatchNorm2d, 16, 32)
    eager = GhostBatchNorm2d(16, 32, device=CUDA)
    eager.load_state_dict(ghost.state_dict())
    compiled = torch.compile(ghost, fullgraph=True)
    x = torch.randn(128, 16, 8, 8, device=CUDA)
    grad_out = torch.randn_like(x)
    y, gx = _step(compiled, x, grad_out)
    y_eager, gx_eager = _step(eager, x, grad_out)
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx_eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ghost.running_var, eager.running_var, rtol=1e-5, atol=1e-6)


def test_converted_model_trains_on_cuda():
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
