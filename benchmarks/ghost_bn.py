"""Ghost batch norm layer speed: GhostBatchNorm vs nn.BatchNorm vs the naive chunk loop.

What it shows: forward + backward time of one layer on one input, for the paper's ghost size 128
(and 32) inside large batches. The three variants run interleaved, in an order rotated every round
(A, B, C, B, C, A, C, A, B, ...), and the median of the repeats is reported, so machine noise hits
all three alike; ratios are what to quote.
CPU with torch.set_num_threads(2); a CUDA column (and torch.compile'd ghost) only when a GPU exists.

Run: python benchmarks/ghost_bn.py [--repeats 31]. Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from bigbatch.layers import GhostBatchNorm1d, GhostBatchNorm2d, _cpu_kernel
from bigbatch.machine import cpu_name

CASES = [  # (label, input shape, ghost size)
    ("1d 4096x512", (4096, 512), 128),
    ("2d 1024x64x16x16", (1024, 64, 16, 16), 128),
    ("2d 1024x64x16x16", (1024, 64, 16, 16), 32),
]


class ChunkLoop(nn.Module):
    """The naive ghost batch norm: nn.BatchNorm on each slice of x.split(g), concatenated."""

    def __init__(self, bn: nn.Module, ghost_batch_size: int) -> None:
        super().__init__()
        self.bn, self.ghost_batch_size = bn, ghost_batch_size

    def forward(self, x):
        return torch.cat([self.bn(chunk) for chunk in x.split(self.ghost_batch_size)])


def _step(layer, x, grad_out, sync):
    x.grad = None
    layer(x).backward(grad_out)
    sync()


def time_interleaved(layers: dict, x, grad_out, repeats: int, sync) -> dict[str, float]:
    """Median milliseconds per forward+backward for each layer, runs interleaved."""
    for layer in layers.values():  # warm-up (and compilation)
        for _ in range(2):
            _step(layer, x, grad_out, sync)
    times = {name: [] for name in layers}
    names = list(layers)
    for i in range(repeats):
        # Rotate the order each round, so that no variant always runs right after the same one
        # (the chunk loop's many allocations change what the next variant's allocations cost).
        for name in names[i % len(names) :] + names[: i % len(names)]:
            layer = layers[name]
            start = time.perf_counter()
            _step(layer, x, grad_out, sync)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def make_layers(shape, ghost_batch_size, device, compile_ghost=False) -> dict:
    channels = shape[1]
    bn_cls, ghost_cls = (
        (nn.BatchNorm1d, GhostBatchNorm1d)
        if len(shape) <= 3
        else (nn.BatchNorm2d, GhostBatchNorm2d)
    )
    layers = {
        "BatchNorm": bn_cls(channels).to(device),
        "chunk loop": ChunkLoop(bn_cls(channels), ghost_batch_size).to(device),
        "GhostBatchNorm": ghost_cls(channels, ghost_batch_size).to(device),
    }
    if compile_ghost:
        layers["ghost compiled"] = torch.compile(ghost_cls(channels, ghost_batch_size).to(device))
    return layers


def run(device: str, repeats: int) -> list[str]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for label, shape, g in CASES:
        torch.manual_seed(0)
        x = torch.randn(*shape, device=device, requires_grad=True)
        grad_out = torch.randn(*shape, device=device)
        layers = make_layers(shape, g, device, compile_ghost=device == "cuda")
        ms = time_interleaved(layers, x, grad_out, repeats, sync)
        bn, chunk, ghost = ms["BatchNorm"], ms["chunk loop"], ms["GhostBatchNorm"]
        row = (
            f"| {device} | {label} | {g} | {bn:.2f} | {chunk:.2f} | {ghost:.2f} | "
            f"{ghost / bn:.2f} | {ghost / chunk:.2f} |"
        )
        if "ghost compiled" in ms:
            row += f" {ms['ghost compiled']:.2f} |"
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(_cpu_kernel.status())  # BIGBATCH_CPU_KERNEL=0 times the PyTorch-ops path instead
    header = (
        "| device | input | ghost | BatchNorm ms | chunk loop ms | GhostBatchNorm ms | "
        "ghost / BN | ghost / chunk |"
    )
    print(header)
    print("|---" * 8 + "|")
    run("cpu", args.repeats)
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
        print(header + " ghost compiled ms |")
        print("|---" * 9 + "|")
        run("cuda", args.repeats)


if __name__ == "__main__":
    main()
