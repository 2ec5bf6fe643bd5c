"""Tests of bigbatch.distributed: pure helpers in-process, DDP with 2 gloo processes on CPU.

The 2-process checks run once (module fixture ``dist_results``): each worker joins the job through
``setup`` (with the variables torchrun would set), runs every scenario and saves what it saw to a
temp dir; the tests compare those files with single-process references computed here.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist
from procs import free_port, spawn_and_wait
from torch import nn

from bigbatch import distributed
from bigbatch.distributed import DistContext
from bigbatch.errors import ConfigError
from bigbatch.train.build import shard_batch_size

WORLD_SIZE = 2
GLOBAL_BATCH = 16  # 8 samples per rank
GHOST = 4  # divides the per-rank batch: ghost batches align with the rank split
NUM_UPDATES = 3
HAS_GHOST_BN = importlib.util.find_spec("bigbatch.layers.ghost_bn") is not None
TOL = {"rtol": 0, "atol": 1e-10}  # float64 throughout; DDP only changes the summation order
# Normalisations for which 2-process DDP must equal single-process training.
NORMS_THAT_MATCH = [
    "none",
    pytest.param("ghost", marks=pytest.mark.skipif(not HAS_GHOST_BN, reason="no ghost_bn.py yet")),
]


# -------------------------------------------------------------------------------------------------
# Shared by the workers and the single-process references
# -------------------------------------------------------------------------------------------------


def _make_model(norm: str) -> nn.Module:
    """A small MLP whose hidden normalisation is plain BN, ghost BN or nothing."""
    torch.manual_seed(0)
    if norm == "bn":
        layer = nn.BatchNorm1d(16)
    elif norm == "ghost":
        from bigbatch.layers.ghost_bn import GhostBatchNorm1d

        layer = GhostBatchNorm1d(16, ghost_batch_size=GHOST)
    else:
        layer = nn.Identity()
    return nn.Sequential(nn.Linear(8, 16), layer, nn.ReLU(), nn.Linear(16, 4)).double()


class _SideBySide(nn.ModuleList):
    """Applies every layer to the same input, so that each BN sees the rank's raw data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self], dim=1)


def _global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 8, generator=g, dtype=torch.float64),
         torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))
        for _ in range(NUM_UPDATES)
    ]


def _train(model, batches, ctx, micro_batches=1, on_first_micro=None):
    """SGD (momentum, weight decay) on each batch, mean loss over the *global* batch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in batches:
        opt.zero_grad()
        chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True))
        for i, (xm, ym) in enumerate(chunks):
            last = i == len(chunks) - 1
            with distributed.no_sync_context(model, last):
                loss = nn.functional.cross_entropy(model(xm), ym, reduction="sum")
                (loss * (ctx.world_size / GLOBAL_BATCH)).backward()  # DDP averages
            if i == 0 and on_first_micro is not None:
                on_first_micro(model)
        opt.step()
    # Parameters only: running stats are rank-local by design (see test_average_bn_running_stats).
    return {k: v.detach().clone() for k, v in distributed.unwrap(model).named_parameters()}


def _my_shard(batches, ctx):
    size = shard_batch_size(GLOBAL_BATCH, ctx.world_size)
    return [(x[ctx.rank * size:(ctx.rank + 1) * size], y[ctx.rank * size:(ctx.rank + 1) * size])
            for x, y in batches]


# -------------------------------------------------------------------------------------------------
# The worker: one process of the 2-process job
# -------------------------------------------------------------------------------------------------


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = distributed.setup("cpu")
    try:
        _run_scenarios(ctx, out_dir)
    finally:
        distributed.teardown(ctx)


def _save(out_dir: str, name: str, rank: int, obj) -> None:
    torch.save(obj, os.path.join(out_dir, f"{name}_rank{rank}.pt"))


def _run_scenarios(ctx: DistContext, out_dir: str) -> None:
    info = {"rank": ctx.rank, "local_rank": ctx.local_rank, "world_size": ctx.world_size,
            "backend": ctx.backend, "device": str(ctx.device), "enabled": ctx.enabled,
            "is_main": ctx.is_main, "initialized": dist.is_initialized()}
    batches = _my_shard(_global_batches(), ctx)

    # DDP training, one pass per update, for each normalisation that exists.
    norms = ["bn", "none"] + (["ghost"] if HAS_GHOST_BN else [])
    for norm in norms:
        model = distributed.wrap_model(_make_model(norm), ctx)
        _save(out_dir, f"ddp_{norm}", ctx.rank, _train(model, batches, ctx))

    # Gradient accumulation: 2 micro-batches per rank, no_sync on the first. Record the local
    # gradient after the first micro-batch, which must differ between ranks (no all-reduce yet).
    for norm in ["none"] + (["ghost"] if HAS_GHOST_BN else []):
        first_grads: list[torch.Tensor] = []

        def record(m, grads=first_grads):
            grads.append(distributed.unwrap(m)[0].weight.grad.clone())

        model = distributed.wrap_model(_make_model(norm), ctx)
        weights = _train(model, batches, ctx, micro_batches=2, on_first_micro=record)
        _save(out_dir, f"accum_{norm}", ctx.rank,
              {"weights": weights, "first_grad": first_grads[0]})

    # Running statistics: different data on each rank, then average.
    layers = [nn.BatchNorm1d(5), nn.BatchNorm1d(5, track_running_stats=False)]
    if HAS_GHOST_BN:
        from bigbatch.layers.ghost_bn import GhostBatchNorm1d

        layers.append(GhostBatchNorm1d(5, ghost_batch_size=4))
    model = distributed.wrap_model(_SideBySide(layers).double(), ctx)
    g = torch.Generator().manual_seed(100 + ctx.rank)
    for _ in range(2):
        model(torch.randn(8, 5, generator=g, dtype=torch.float64) * (ctx.rank + 1) + ctx.rank)
    before = {k: v.clone() for k, v in distributed.unwrap(model).state_dict().items()}
    distributed.average_bn_running_stats(model, ctx)
    after = {k: v.clone() for k, v in distributed.unwrap(model).state_dict().items()}
    _save(out_dir, "bn_stats", ctx.rank, {"before": before, "after": after})

    # Collectives for sharded evaluation.
    metrics = distributed.reduce_metrics(
        {"samples": 10 * (ctx.rank + 1), "loss_sum": 1.25 * (ctx.rank + 1),
         "correct": torch.tensor(3.0 + ctx.rank)}, ctx)
    tensor = torch.arange(3, dtype=torch.float32) * (ctx.rank + 1)
    summed = distributed.all_reduce_sum(tensor, ctx)
    info.update(
        metrics=metrics,
        metric_types={k: type(v).__name__ for k, v in metrics.items()},
        tensor_sum=summed.tolist(), tensor_unchanged=tensor.tolist(),
        floats_sum=distributed.all_reduce_sum([0.5, 1.0 * ctx.rank], ctx),
        float_sum=distributed.all_reduce_sum(2.5, ctx),
        broadcast=distributed.broadcast_object({"from": ctx.rank}, ctx),
    )
    distributed.barrier(ctx)
    with open(os.path.join(out_dir, f"info_rank{ctx.rank}.json"), "w") as f:
        json.dump(info, f)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """Run the 2-process job once; return a loader of what rank r saved under a name."""
    out_dir = tmp_path_factory.mktemp("dist")
    spawn_and_wait(_worker, (free_port(), str(out_dir)), WORLD_SIZE)

    def load(name: str, rank: int):
        if name == "info":
            return json.loads((out_dir / f"info_rank{rank}.json").read_text())
        return torch.load(out_dir / f"{name}_rank{rank}.pt", weights_only=True)

    return load


def _single_process(norm: str) -> dict[str, torch.Tensor]:
    return _train(_make_model(norm), _global_batches(), DistContext())


def _assert_state_close(actual, expected):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **TOL, msg=k)


def _max_diff(a, b) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


# -------------------------------------------------------------------------------------------------
# Single process: no torchrun
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_setup_outside_torchrun_is_disabled_and_initialises_nothing(no_torchrun):
    ctx = distributed.setup("cpu")
    assert ctx == DistContext(device=torch.device("cpu"))
    assert (ctx.enabled, ctx.rank, ctx.world_size, ctx.backend) == (False, 0, 1, None)
    assert ctx.is_main
    assert not dist.is_initialized()
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx) is model
    assert distributed.unwrap(model) is model
    assert distributed.unwrap(nn.DataParallel(model)) is model
    metrics = {"correct": 3, "loss": 1.5}
    assert distributed.reduce_metrics(metrics, ctx) == metrics
    assert distributed.broadcast_object([1, 2], ctx) == [1, 2]
    distributed.barrier(ctx)
    distributed.average_bn_running_stats(nn.BatchNorm1d(3), ctx)
    distributed.teardown(ctx)
    assert not dist.is_initialized()


def test_setup_auto_device(no_torchrun):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.setup().device.type == expected


def test_setup_with_partial_torchrun_environment(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    message = "LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not; launch with torchrun"
    with pytest.raises(ConfigError, match=message):
        distributed.setup("cpu")
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_setup_cuda_without_cuda(no_torchrun):
    with pytest.raises(ConfigError, match="CUDA is not available; use --device cpu"):
        distributed.setup("cuda")


# -------------------------------------------------------------------------------------------------
# Two processes (gloo)
# -------------------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_setup_under_torchrun_environment(dist_results):
    for rank in range(WORLD_SIZE):
        info = dist_results("info", rank)
        assert {k: info[k] for k in ("rank", "local_rank", "world_size", "backend", "device",
                                     "enabled", "is_main", "initialized")} == {
            "rank": rank, "local_rank": rank, "world_size": WORLD_SIZE, "backend": "gloo",
            "device": "cpu", "enabled": True, "is_main": rank == 0, "initialized": True}


@pytest.mark.distributed
@pytest.mark.parametrize("norm", NORMS_THAT_MATCH)
def test_ddp_matches_single_process(dist_results, norm):
    """Each rank trains on its contiguous half; the weights equal training on the global batch."""
    expected = _single_process(norm)
    initial = dict(_make_model(norm).named_parameters())
    assert _max_diff(expected, initial) > 1e-3  # training moved the weights
    for rank in range(WORLD_SIZE):
        _assert_state_close(dist_results(f"ddp_{norm}", rank), expected)


@pytest.mark.distributed
def test_ddp_with_plain_bn_differs_from_single_process(dist_results):
    """Negative control: plain BN normalises each rank's half with its own statistics."""
    ddp = [dist_results("ddp_bn", rank) for rank in range(WORLD_SIZE)]
    _assert_state_close(ddp[1], ddp[0])  # the ranks still agree with each other
    assert _max_diff(ddp[0], _single_process("bn")) > 1e-4


@pytest.mark.distributed
@pytest.mark.parametrize("norm", NORMS_THAT_MATCH)
def test_gradient_accumulation_with_no_sync_equals_one_pass(dist_results, norm):
    expected = _single_process(norm)
    accum = [dist_results(f"accum_{norm}", rank) for rank in range(WORLD_SIZE)]
    for rank in range(WORLD_SIZE):
        _assert_state_close(accum[rank]["weights"], dist_results(f"ddp_{norm}", rank))
        _assert_state_close(accum[rank]["weights"], expected)
    # Inside no_sync the first micro-batch's gradient stayed local: the ranks saw different data.
    assert (accum[0]["first_grad"] - accum[1]["first_grad"]).abs().max() > 1e-6


@pytest.mark.distributed
def test_average_bn_running_stats(dist_results):
    stats = [dist_results("bn_stats", rank) for rank in range(WORLD_SIZE)]
    running = [k for k in stats[0]["before"] if "running_" in k]
    assert len(running) == 2 * (1 + HAS_GHOST_BN)  # the BN without running stats has none
    for k in running:
        before = [s["before"][k] for s in stats]
        assert (before[0] - before[1]).abs().max() > 0.1  # different data: the ranks disagreed
        mean = (before[0] + before[1]) / 2
        for s in stats:
            torch.testing.assert_close(s["after"][k], mean, **TOL)
    for k in [k for k in stats[0]["before"] if "num_batches_tracked" in k]:
        for s in stats:
            assert s["after"][k] == s["before"][k]


@pytest.mark.distributed
def test_collectives_for_sharded_evaluation(dist_results):
    infos = [dist_results("info", rank) for rank in range(WORLD_SIZE)]
    for rank, info in enumerate(infos):
        assert info["metrics"] == {"samples": 30, "loss_sum": 3.75, "correct": 7.0}
        assert info["metric_types"] == {"samples": "int", "loss_sum": "float", "correct": "float"}
        assert info["tensor_sum"] == [0.0, 3.0, 6.0]
        assert info["tensor_unchanged"] == [0.0, 1.0 * (rank + 1), 2.0 * (rank + 1)]
        assert info["floats_sum"] == [1.0, 1.0]
        assert info["float_sum"] == 5.0
        assert info["broadcast"] == {"from": 0}


# -------------------------------------------------------------------------------------------------
# Teardown right after a collective, with DDP kept alive by an exception's traceback
# -------------------------------------------------------------------------------------------------
TEARDOWN_ROUNDS = 8


class _Raised(Exception):
    pass


def _gather_then_raise(model: nn.Module, ctx: DistContext) -> None:
    model(torch.randn(4, 3)).sum().backward()
    distributed.gather_objects({"rank": ctx.rank}, ctx)
    raise _Raised  # the traceback holds this frame, and with it the DDP model


def _teardown_worker(rank: int, ports: list[int], drain_s: float) -> None:
    torch.set_num_threads(1)
    distributed._GLOO_DRAIN_S = drain_s
    for port in ports:  # a new process group each round: the race is per teardown
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        ctx = distributed.setup("cpu")
        try:
            _gather_then_raise(distributed.wrap_model(nn.Linear(3, 2), ctx), ctx)
        except _Raised as exc:
            raised = exc
        distributed.teardown(ctx)
        del raised  # frees DDP's Reducer, the group's last owner, with the GIL held


@pytest.mark.distributed
def test_teardown_right_after_a_collective_does_not_deadlock():
    # Without teardown's pause, ~ProcessGroupGloo (run from the Reducer's destructor, GIL held)
    # joins a gloo thread that waits for the GIL to free the gathered tensors: with the pause
    # off, 3 of 4 six-round jobs hung (pytorch/pytorch#56297; it hung test_distributed_rng in CI).
    ports = [free_port() for _ in range(TEARDOWN_ROUNDS)]
    spawn_and_wait(_teardown_worker, (ports, distributed._GLOO_DRAIN_S), WORLD_SIZE, timeout_s=90)
