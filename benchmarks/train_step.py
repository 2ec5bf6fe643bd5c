"""Training-step throughput: one pass with vectorised ghost BN vs the official code's chunk loop.

What it shows: samples/s of a full large-batch + ghost-batch-norm training step (forward, backward,
SGD step) done two ways, with the same model and batch:
  * ``one pass``: the whole batch goes through the model once; every BatchNorm is a
    ``GhostBatchNorm`` (ghost 128), as ``bigbatch train --ghost-batch-size 128`` runs it;
  * ``official``: the 2017 code's way (``main_gbn.py``): plain BatchNorm, forward and backward once
    per 128-sample chunk, gradients accumulated, then one step.
Both compute the same update (up to float summation order). Cases: F1 (MLP 784-512x5-10) at batch
4096 on 1x28x28 inputs, ResNet44 at batch 1024 on 3x32x32, on CPU with 2 threads, and on CUDA too
when present, where ResNet44 also runs at batch 4096 (issue 13's target: one pass >= 5x the loop).
Runs are interleaved (A, B, A, B, ...) after a warm-up; the median is reported.

Usage: python benchmarks/train_step.py [--repeats N] [--device cpu|cuda|all] [--quick]
Results, with the machine they came from: benchmarks/RESULTS.md, section "Training step".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bigbatch import models
from bigbatch.layers import convert_ghost_batchnorm
from bigbatch.machine import cpu_name

GHOST = 128
CASES = [  # (model, options, batch, (channels, size), repeats on CPU; 0: CUDA only)
    ("f1", {}, 4096, (1, 28), 7),
    ("resnet44", {}, 1024, (3, 32), 2),  # ~25 s per step on a 2-core CPU
    ("resnet44", {}, 4096, (3, 32), 0),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make(name, options, shape, device, ghost: bool):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=shape[0], image_size=shape[1],
                          **options)
    if ghost:
        model = convert_ghost_batchnorm(model, ghost_batch_size=GHOST)
    model = model.to(device).train()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def step_one_pass(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def step_official(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    chunks = x.shape[0] // GHOST
    for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
        (F.cross_entropy(model(xc), yc) / chunks).backward()
    opt.step()


def bench(name, options, batch, shape, device, repeats: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *(shape[0], shape[1], shape[1]), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    if name != "f1" and device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    ways = {
        "one pass (ghost BN)": (step_one_pass, *_make(name, options, shape, device, ghost=True)),
        "official (chunk loop)": (step_official, *_make(name, options, shape, device, ghost=False)),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for fn, model, opt in ways.values():  # warm-up (allocator, cuDNN autotune)
        fn(model, opt, x, y)
    _sync(device)
    for _ in range(repeats):
        for label, (fn, model, opt) in ways.items():
            t0 = time.perf_counter()
            fn(model, opt, x, y)
            _sync(device)
            times[label].append(time.perf_counter() - t0)
    return {label: batch / statistics.median(ts) for label, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per way")
    parser.add_argument("--device", default="all", help="cpu, cuda or all (default)")
    parser.add_argument("--quick", action="store_true", help="F1 only (a few seconds)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not torch.cuda.is_available():
        devices = [d for d in devices if d != "cuda"]
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print(f"{'device':<7}{'model':<10}{'batch':>6}  {'one pass':>12}  {'official':>12}  speed-up")
    for device in map(torch.device, devices):
        for name, options, batch, shape, cpu_repeats in CASES[:1] if args.quick else CASES:
            if device.type == "cpu" and cpu_repeats == 0:
                continue
            repeats = args.repeats or (cpu_repeats if device.type == "cpu" else 20)
            r = bench(name, options, batch, shape, device, repeats)
            one, official = r["one pass (ghost BN)"], r["official (chunk loop)"]
            print(f"{device.type:<7}{name:<10}{batch:>6}  {one:>9.0f}/s  {official:>9.0f}/s  "
                  f"{one / official:.2f}x", flush=True)


if __name__ == "__main__":
    main()
