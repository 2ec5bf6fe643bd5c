"""Small-batch gradient norms from micro-batches and from 2 DDP processes agree with one process."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
from procs import free_port, spawn_and_wait
from torch import nn

from bigbatch.diagnostics import (
    DDPGradNorms,
    GradientNoiseScale,
    MicroBatchGradNorms,
    estimate_noise_scale,
    squared_grad_norm,
)

BATCH, WORLD_SIZE = 32, 2
LOSS = nn.functional.cross_entropy


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, 6, generator=g, dtype=torch.float64)
    return x, x[:, :3].argmax(1)


def _one_update_estimate(small_sq: float, small: int, big_sq: float) -> GradientNoiseScale:
    gns = GradientNoiseScale(decay=0.0)  # a single update: the estimate of that update
    gns.update(small_sq, small, big_sq, BATCH)
    return gns


def _assert_same(gns: GradientNoiseScale, expected) -> None:
    assert gns.grad_sq_norm == pytest.approx(expected.grad_sq_norm, rel=1e-9)
    assert gns.trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-9)
    assert gns.b_simple == pytest.approx(expected.b_simple, rel=1e-9)


@pytest.mark.parametrize("micro", [4, 8, 16])
def test_micro_batch_norms_give_the_one_shot_estimate(micro):
    model = _model()
    x, y = _batch()
    expected = estimate_noise_scale(model, LOSS, [(x, y)], micro)
    norms = MicroBatchGradNorms(model.parameters())
    k = BATCH // micro
    for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
        (LOSS(model(xs), ys) / k).backward()  # the usual accumulation of a mean gradient
        norms.end_micro_batch()
    small = norms.pop(grad_multiplier=k)
    assert small.shape == (k,)
    big_sq = squared_grad_norm(model.parameters())
    _assert_same(_one_update_estimate(float(small.mean()), micro, float(big_sq)), expected)
    # .grad accumulated untouched: it is the big batch's gradient
    reference = _model()
    LOSS(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    # negative control: the accumulated .grad's norm after each micro-batch is not |g_s|^2
    assert not torch.allclose(small, big_sq.expand(k))
    with pytest.raises(ValueError, match="call end_micro_batch"):
        norms.pop()  # nothing closed since the last pop
    norms.remove()
    model(x).sum().backward()
    norms.end_micro_batch()
    assert norms.pop().tolist() == [0.0]  # removed hooks record nothing


def test_micro_batch_norms_per_micro_batch_values():
    model = _model()
    x, y = _batch()
    norms = MicroBatchGradNorms(model.parameters())
    for xs, ys in zip(x.split(8), y.split(8), strict=True):
        LOSS(model(xs), ys).backward()
        norms.end_micro_batch()
    got = norms.pop()
    for i, (xs, ys) in enumerate(zip(x.split(8), y.split(8), strict=True)):
        alone = _model()
        LOSS(alone(xs), ys).backward()
        flat = torch.cat([p.grad.flatten() for p in alone.parameters()])
        assert float(got[i]) == pytest.approx(float(flat @ flat), rel=1e-12)


def test_unequal_micro_batches_with_per_micro_batch_multipliers():
    """Micro-batches 16, 8, 8 weighted b_i / B: the mean |g_i|^2 is at the harmonic mean size."""
    model = _model()
    x, y = _batch()
    sizes = [16, 8, 8]
    norms = MicroBatchGradNorms(model.parameters())
    singles = []
    for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
        alone = _model()
        LOSS(alone(xs), ys).backward()
        singles.append(float(sum(p.grad.square().sum() for p in alone.parameters())))
        (LOSS(model(xs), ys) * len(xs) / BATCH).backward()
        norms.end_micro_batch()
    got = norms.pop(grad_multiplier=[BATCH / b for b in sizes])
    assert got.tolist() == pytest.approx(singles, rel=1e-12)
    with pytest.raises(ValueError, match="2 grad multipliers for 1 micro-batches"):
        model(x[:4]).sum().backward()
        norms.end_micro_batch()
        norms.pop(grad_multiplier=[1.0, 2.0])


def test_micro_batch_norms_can_skip_updates():
    model = _model()
    x, y = _batch()
    norms = MicroBatchGradNorms(model.parameters())
    norms.enabled = False
    LOSS(model(x[:8]), y[:8]).backward()
    norms.end_micro_batch()
    with pytest.raises(ValueError, match="no micro-batch to report"):
        norms.pop()  # nothing recorded while disabled
    norms.enabled = True
    model.zero_grad()
    LOSS(model(x[8:16]), y[8:16]).backward()
    norms.end_micro_batch()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert norms.pop().tolist() == pytest.approx([float(flat @ flat)], rel=1e-12)


def test_micro_batch_norms_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        MicroBatchGradNorms(frozen.parameters())
    with pytest.raises(ValueError, match="needs a DistributedDataParallel model, got Linear"):
        DDPGradNorms(nn.Linear(2, 2))


# -- 2 gloo processes ------------------------------------------------------------------------------
def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.save(_ddp_scenarios(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ddp_scenarios(rank: int) -> dict[str, tuple[float, float]]:
    """One update without accumulation and one with 2 micro-batches under no_sync, per process."""
    from torch.nn.parallel import DistributedDataParallel

    x, y = _batch()
    shard = BATCH // WORLD_SIZE
    xs, ys = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
    out = {}
    for micro_batches in (1, 2):
        model = DistributedDataParallel(_model(), bucket_cap_mb=0.0001)  # several buckets
        norms = DDPGradNorms(model)
        micro = shard // micro_batches
        for i in range(micro_batches):
            chunk = slice(i * micro, (i + 1) * micro)
            context = model.no_sync() if i < micro_batches - 1 else contextlib.nullcontext()
            with context:
                (LOSS(model(xs[chunk]), ys[chunk]) / micro_batches).backward()
        local, global_ = norms.collect()
        out[f"micro{micro_batches}"] = (float(local), float(global_),
                                        float(squared_grad_norm(model.parameters())))
        again = norms.collect()  # reset after reading
        out[f"micro{micro_batches}_reset"] = (float(again[0]), float(again[1]))
    # Switched off: the hook only averages (the same gradient) and records nothing.
    model = DistributedDataParallel(_model(), bucket_cap_mb=0.0001)
    norms = DDPGradNorms(model)
    norms.enabled = False
    LOSS(model(xs), ys).backward()
    off = norms.collect()
    out["disabled"] = (float(off[0]), float(off[1]), float(squared_grad_norm(model.parameters())))
    return out


@pytest.mark.distributed
def test_ddp_hook_gives_the_one_process_estimate(tmp_path):
    spawn_and_wait(_worker, (free_port(), str(tmp_path)), WORLD_SIZE)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert results[0] == results[1]  # every process gets the same numbers
    model = _model()
    x, y = _batch()
    expected = estimate_noise_scale(model, LOSS, [(x, y)], BATCH // WORLD_SIZE)
    for key in ("micro1", "micro2"):
        local, global_, grad_norm = results[0][key]
        assert global_ == pytest.approx(grad_norm, rel=1e-12)  # after the all-reduce = p.grad
        _assert_same(_one_update_estimate(local, BATCH // WORLD_SIZE, global_), expected)
        assert results[0][f"{key}_reset"] == (0.0, 0.0)
    assert results[0]["disabled"][:2] == (0.0, 0.0)
    assert results[0]["disabled"][2] == pytest.approx(results[0]["micro1"][2], rel=1e-12)
    # negative control: the local norm is not the global one
    assert results[0]["micro1"][0] > 1.1 * results[0]["micro1"][1]
