"""DDP training-step throughput: ResNet44 at global batch 4096, with and without ghost batch norm.

What it shows: the median time of one full update (forward, backward with DDP's gradient
all-reduce, SGD step) and samples/s, for plain BatchNorm and for GhostBatchNorm (ghost 128), built
as ``bigbatch train`` builds them (``distributed.setup``/``wrap_model``, ``forward_backward`` with
``no_sync`` on all but the last micro-batch). The global batch is split over the processes, so
one GPU processes 4096 samples per update and N GPUs 4096 / N each.

Usage:
  python benchmarks/ddp_step.py                                  # one GPU (skips without CUDA)
  torchrun --standalone --nproc-per-node 8 benchmarks/ddp_step.py   # 8 GPUs, NCCL
  python benchmarks/ddp_step.py --cpu-sanity                     # 2 gloo processes on CPU, tiny
Options: --batch-size (global, 4096), --ghost-batch-size (128), --micro-batch-size (none),
--repeats (10), --bf16. Results, with the machine they came from: benchmarks/RESULTS.md, section
"DDP step".

The CPU sanity mode is no benchmark: it runs F1 (hidden 16) at global batch 64 in 2 gloo processes
for a few updates and checks that both processes end with the same weights.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from bigbatch import distributed, models
from bigbatch.layers import convert_ghost_batchnorm
from bigbatch.train.build import check_ghost_alignment, shard_batch_size
from bigbatch.train.step import forward_backward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(model_name: str, options: dict, ghost: int | None, ctx, shape) -> torch.nn.Module:
    torch.manual_seed(0)
    channels, size = shape
    model = models.create(model_name, num_classes=10, in_channels=channels, image_size=size,
                          **options)
    if ghost is not None:
        model = convert_ghost_batchnorm(model, ghost_batch_size=ghost)
    model = model.to(ctx.device)
    if ctx.device.type == "cuda" and channels > 1:
        model = model.to(memory_format=torch.channels_last)
    return distributed.wrap_model(model, ctx)


def time_steps(ctx, model_name, options, shape, *, batch_size, ghost, micro, repeats, bf16):
    """(median seconds per update over processes' slowest, the trained model), after 3 warm-ups."""
    per_rank = shard_batch_size(batch_size, ctx.world_size)
    check_ghost_alignment(per_rank, ghost)
    model = _build(model_name, options, ghost, ctx, shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(ctx.rank)
    x = torch.randn(per_rank, shape[0], shape[1], shape[1], generator=g).to(ctx.device)
    if ctx.device.type == "cuda" and shape[0] > 1:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (per_rank,), generator=g).to(ctx.device)
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if bf16 else None
    times = []
    for i in range(3 + repeats):
        distributed.barrier(ctx)
        _sync(ctx.device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        forward_backward(model, x, y, global_batch_size=batch_size, micro_batch_size=micro,
                         autocast=autocast, world_size=ctx.world_size,
                         no_sync=lambda last: distributed.no_sync_context(model, last))
        optimizer.step()
        _sync(ctx.device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    # The slowest process sets the pace of a synchronous update.
    return model, max(distributed.all_reduce_sum([0.0] * ctx.rank + [statistics.median(times)]
                                          + [0.0] * (ctx.world_size - ctx.rank - 1), ctx))


def gpu_benchmark(args) -> int:
    if not torch.cuda.is_available():
        print("ddp_step: skipped: no CUDA GPU on this machine. The GPU figures need one, e.g.\n"
              "  python benchmarks/ddp_step.py            (one GPU)\n"
              "  torchrun --standalone --nproc-per-node 8 benchmarks/ddp_step.py\n"
              "and `python benchmarks/ddp_step.py --cpu-sanity` checks the 2-process path on CPU.")
        return 0
    ctx = distributed.setup("cuda")
    torch.backends.cudnn.benchmark = True
    try:
        rows = []
        for ghost in (None, args.ghost_batch_size):
            _, seconds = time_steps(ctx, "resnet44", {}, (3, 32), batch_size=args.batch_size,
                                 ghost=ghost, micro=args.micro_batch_size, repeats=args.repeats,
                                 bf16=args.bf16)
            rows.append((ghost, seconds))
        if ctx.is_main:
            name = torch.cuda.get_device_name(ctx.device)
            print(f"ResNet44, global batch {args.batch_size}, {ctx.world_size} x {name}, "
                  f"backend {ctx.backend or 'none'}, micro-batch {args.micro_batch_size}, "
                  f"{'bf16' if args.bf16 else 'fp32'}, torch {torch.__version__}, median of "
                  f"{args.repeats}")
            print("| BN | step ms | samples/s |\n|---|---:|---:|")
            for ghost, seconds in rows:
                label = f"ghost {ghost}" if ghost else "BatchNorm"
                print(f"| {label} | {1000 * seconds:.1f} | {args.batch_size / seconds:.0f} |")
    finally:
        distributed.teardown(ctx)
    return 0


def _sanity_worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = distributed.setup("cpu")
    try:
        model, seconds = time_steps(ctx, "f1", {"hidden": 16}, (1, 8), batch_size=64, ghost=8,
                                    micro=16, repeats=5, bf16=False)
        # Different data on each rank, averaged gradients: the trained weights must agree.
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        spread = (distributed.all_reduce_sum(flat, ctx) / 2 - flat).abs().max().item()
        if ctx.is_main:
            print(f"cpu sanity (2 gloo processes, F1 hidden 16, global batch 64, ghost 8, "
                  f"micro 16): {1000 * seconds:.1f} ms/update, {64 / seconds:.0f} samples/s, "
                  f"weights differ across ranks by {spread:.1e}")
        if spread != 0.0:
            raise SystemExit("ddp_step: the two processes' weights differ")
    finally:
        distributed.teardown(ctx)


def cpu_sanity() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sanity_worker, args=(port,), nprocs=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-sanity", action="store_true")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--ghost-batch-size", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args(argv)
    return cpu_sanity() if args.cpu_sanity else gpu_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
