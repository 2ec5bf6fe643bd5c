"""convert_ghost_batchnorm / revert: same tensors, exact inverse, chunked-BN maths."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import chunk_batchnorm_model
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from bigbatch.layers import (
    GhostBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    GhostBatchNorm3d,
    convert_ghost_batchnorm,
    revert_ghost_batchnorm,
)


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        Block(4),
        Block(4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.BatchNorm1d(8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return model


def bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_converted_model_matches_chunked_reference():
    model = small_resnet().double()  # float64: compare the maths, not float32 rounding
    reference = chunk_batchnorm_model(copy.deepcopy(model), 4)
    model = convert_ghost_batchnorm(model, ghost_batch_size=4)
    assert bn_types(model) == [GhostBatchNorm2d] * 5 + [GhostBatchNorm1d]
    for _ in range(2):
        x = torch.randn(10, 1, 6, 6, dtype=torch.float64)  # ghost batches 4, 4, 2
        model.zero_grad()
        reference.zero_grad()
        y, y_ref = model(x), reference(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-10)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for p, p_ref in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10)
        for b, b_ref in zip(model.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(b, b_ref, rtol=1e-9, atol=1e-10)
    model.eval()
    reference.eval()
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(model(x), reference(x), rtol=1e-9, atol=1e-10)


def test_same_tensors_flags_and_optimizer():
    model = small_resnet()
    model[3].bn1.weight.requires_grad_(False)
    model[4].eval()
    params = {name: p for name, p in model.named_parameters()}
    buffers = {name: b for name, b in model.named_buffers()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    training = {name: m.training for name, m in model.named_modules()}
    model = convert_ghost_batchnorm(model, 4)
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert {n: id(b) for n, b in model.named_buffers()} == {n: id(b) for n, b in buffers.items()}
    assert not model[3].bn1.weight.requires_grad
    assert {name: m.training for name, m in model.named_modules()} == training
    before = model[8].weight.detach().clone()
    model(torch.randn(8, 1, 6, 6)).sum().backward()
    optimizer.step()  # the optimizer made before conversion still drives the ghost layers
    assert not torch.equal(model[8].weight, before)


def test_round_trip_is_identity_and_idempotent():
    model = small_resnet()
    types = bn_types(model)
    state = {k: v for k, v in model.state_dict().items()}
    ghost = convert_ghost_batchnorm(model, 8)
    layers = list(ghost.modules())
    again = convert_ghost_batchnorm(ghost, 8)
    assert again is ghost and list(again.modules()) == layers  # nothing changes
    assert all(m.ghost_batch_size == 8 for m in ghost.modules() if isinstance(m, GhostBatchNorm2d))
    convert_ghost_batchnorm(ghost, 16)  # converting again re-sizes the existing ghost layers
    assert {m.ghost_batch_size for m in ghost.modules() if hasattr(m, "ghost_batch_size")} == {16}
    back = revert_ghost_batchnorm(ghost)
    assert bn_types(back) == types
    assert back.state_dict().keys() == state.keys()
    assert all(
        back.state_dict()[k] is v or torch.equal(back.state_dict()[k], v) for k, v in state.items()
    )
    assert revert_ghost_batchnorm(back) is back  # no ghost layers: nothing to do


@pytest.mark.parametrize(
    ("bn", "ghost_cls", "shape"),
    [
        (nn.BatchNorm1d(3), GhostBatchNorm1d, (6, 3)),
        (nn.BatchNorm2d(3), GhostBatchNorm2d, (6, 3, 2, 2)),
        (nn.BatchNorm3d(3), GhostBatchNorm3d, (6, 3, 2, 2, 2)),
    ],
)
def test_root_layer_and_rank_mapping(bn, ghost_cls, shape):
    bn.eval()
    ghost = convert_ghost_batchnorm(bn, 2)
    assert type(ghost) is ghost_cls and ghost is not bn
    assert ghost.weight is bn.weight and ghost.running_var is bn.running_var
    assert not ghost.training
    x = torch.randn(*shape)
    torch.testing.assert_close(ghost(x), bn(x), rtol=0, atol=0)
    back = revert_ghost_batchnorm(ghost)
    assert type(back) is type(bn) and back.weight is bn.weight


def test_options_survive():
    bn = nn.BatchNorm2d(3, eps=1e-3, momentum=None, affine=False, track_running_stats=False)
    ghost = convert_ghost_batchnorm(bn, 4)
    assert (ghost.eps, ghost.momentum, ghost.affine, ghost.track_running_stats) == (
        1e-3, None, False, False,
    )  # fmt: skip
    assert ghost.weight is None and ghost.running_mean is None
    bn = nn.BatchNorm1d(3)
    bn.bias = None  # what nn.BatchNorm1d(3, bias=False) makes, on torch versions that have it
    no_bias = convert_ghost_batchnorm(bn, 4)
    assert no_bias.bias is None and no_bias.weight is not None
    assert revert_ghost_batchnorm(no_bias).bias is None


def test_no_bias_round_trip_on_a_torch_without_the_bias_argument(torch_without_batchnorm_bias):
    """Older torch (2.11, seen on a GPU machine): nn.BatchNorm has no bias= argument."""
    bn = nn.BatchNorm2d(3)
    bn.bias = None
    ghost = convert_ghost_batchnorm(bn, 4)
    assert ghost.bias is None and ghost.weight is bn.weight
    back = revert_ghost_batchnorm(ghost)
    assert type(back) is nn.BatchNorm2d and back.bias is None and back.weight is bn.weight


def test_sync_batchnorm_maps_to_rank_agnostic_ghost():
    group = object()  # stands in for a process group: no process group is needed to convert
    model = nn.Sequential(nn.SyncBatchNorm(3, process_group=group))
    ghost = convert_ghost_batchnorm(model, 4)[0]
    assert type(ghost) is GhostBatchNorm and ghost.process_group is group
    for shape in [(10, 3), (10, 3, 5), (10, 3, 2, 2)]:  # any rank, like SyncBatchNorm
        assert ghost(torch.randn(*shape)).shape == shape
    back = revert_ghost_batchnorm(model)[0]
    assert type(back) is nn.SyncBatchNorm and back.process_group is group
    assert back.weight is ghost.weight


def test_batchnorm_subclass_left_alone():
    class BatchNormReLU(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    model = nn.Sequential(BatchNormReLU(3))
    assert type(convert_ghost_batchnorm(model, 4)[0]) is BatchNormReLU


def test_refuses_ddp_and_bad_size():
    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)  # no process group needed
    with pytest.raises(ValueError, match="convert model.module, then wrap again"):
        convert_ghost_batchnorm(wrapped, 4)
    with pytest.raises(ValueError, match="convert model.module, then wrap again"):
        revert_ghost_batchnorm(wrapped)
    with pytest.raises(ValueError, match="ghost_batch_size must be a positive int"):
        convert_ghost_batchnorm(small_resnet(), 0)
