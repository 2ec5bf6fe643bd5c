"""Ghost batch norm layer speed: GhostBatchNorm vs nn.BatchNorm vs the naive chunk loop.

What it shows: forward + backward time of one layer on one input, for the paper's ghost size 128
(and 32) inside large batches. The variants run interleaved, in an order rotated every round (A, B,
C, B, C, A, C, A, B, ...), and the median of the repeats is reported, so machine noise hits all
alike; ratios are what to quote. CPU with torch.set_num_threads(2), float32, contiguous.

On CUDA (when present) each case also runs channels_last and bfloat16 input (float32 parameters, as
under autocast), and the ghost layer three ways: ``ghost`` (the backend ``BIGBATCH_GBN_BACKEND``
picks, Triton by default: printed), ``ghost ops`` (the PyTorch-ops path) and ``ghost compiled``
(``torch.compile``, inductor). ``BatchNorm`` is whatever ``F.batch_norm`` runs for that input
(cuDNN or ATen's native kernels). Before the layer table, ``--kernels`` times the Triton kernels
alone on preallocated buffers against ``torch.batch_norm`` forward.

Run: python benchmarks/ghost_bn.py [--repeats 31] [--device cpu|cuda|all] [--kernels]. Results
are recorded in benchmarks/RESULTS.md with the machine and the versions this prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from bigbatch.layers import GhostBatchNorm1d, GhostBatchNorm2d, backend_for, backend_summary
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


class WithBackend(nn.Module):
    """Runs ``layer`` with ``BIGBATCH_GBN_BACKEND`` set to ``name`` (the backward follows it)."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.layer, self.name = layer, name

    def forward(self, x):
        before = os.environ.get("BIGBATCH_GBN_BACKEND")
        os.environ["BIGBATCH_GBN_BACKEND"] = self.name
        try:
            return self.layer(x)
        finally:
            if before is None:
                del os.environ["BIGBATCH_GBN_BACKEND"]
            else:
                os.environ["BIGBATCH_GBN_BACKEND"] = before


def _step(layer, x, grad_out, sync):
    x.grad = None
    layer(x).backward(grad_out)
    sync()


def time_interleaved(layers: dict, x, grad_out, repeats: int, sync) -> dict[str, float]:
    """Median milliseconds per forward+backward for each layer, runs interleaved."""
    for layer in layers.values():  # warm-up (and compilation)
        for _ in range(3):
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


def make_layers(shape, ghost_batch_size, device) -> dict:
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
    if device == "cuda":
        layers["ghost ops"] = WithBackend(ghost_cls(channels, ghost_batch_size).to(device), "torch")
        layers["ghost compiled"] = torch.compile(ghost_cls(channels, ghost_batch_size).to(device))
    return layers


def _variants(device: str):
    """(memory format name, dtype) pairs timed on ``device``."""
    if device != "cuda":
        return [("contiguous", torch.float32)]
    return [(fmt, dtype) for dtype in (torch.float32, torch.bfloat16)
            for fmt in ("contiguous", "channels_last")]  # fmt: skip


def run(device: str, repeats: int) -> list[str]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for label, shape, g in CASES:
        for fmt, dtype in _variants(device):
            if fmt == "channels_last" and len(shape) != 4:
                continue
            torch.manual_seed(0)
            x = torch.randn(*shape, device=device, dtype=dtype)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            ms = time_interleaved(make_layers(shape, g, device), x, torch.randn_like(x), repeats,
                                  sync)  # fmt: skip
            bn, chunk, ghost = ms["BatchNorm"], ms["chunk loop"], ms["GhostBatchNorm"]
            row = (
                f"| {device} | {label} | {g} | {fmt} | {str(dtype)[6:]} | "
                f"{backend_for(x).name} | {bn:.3f} | {chunk:.3f} | {ghost:.3f} | "
                f"{ghost / bn:.2f} | {ghost / chunk:.2f} |"
            )
            if "ghost compiled" in ms:
                row += f" {ms['ghost ops']:.3f} | {ms['ghost compiled']:.3f} |"
            rows.append(row)
            print(row, flush=True)
    return rows


def _median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _kernel_row(label: str, shape, g: int, fmt: str, dtype, repeats: int) -> str:
    from bigbatch.layers import _triton_kernel

    x = torch.randn(*shape, device="cuda", dtype=dtype)
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.ones(shape[1], device="cuda")
    out, dx, dy = torch.empty_like(x), torch.empty_like(x), torch.randn_like(x)
    last = x.dim() == 2 or fmt == "channels_last"
    mean, _, rstd = _triton_kernel.forward(x, w, w, g, 1e-5, last, out)
    fwd = _median_ms(lambda: _triton_kernel.forward(x, w, w, g, 1e-5, last, out), repeats)
    bwd = _median_ms(lambda: _triton_kernel.backward(x, dy, w, mean, rstd, g, last, dx), repeats)
    bn = _median_ms(lambda: torch.batch_norm(x, w, w, None, None, True, 0.1, 1e-5, True), repeats)
    return f"| {label} | {g} | {fmt} | {str(dtype)[6:]} | {bn:.3f} | {fwd:.3f} | {bwd:.3f} |"


def time_kernels(repeats: int) -> None:
    """The Triton kernels alone (preallocated outputs, CUDA events) against torch.batch_norm's
    forward on the same input."""
    print("| input | ghost | layout | dtype | BN fwd ms | triton fwd ms | triton bwd ms |")
    print("|---" * 7 + "|")
    for label, shape, g in CASES:
        for fmt, dtype in _variants("cuda"):
            if fmt == "contiguous" or len(shape) == 4:
                print(_kernel_row(label, shape, g, fmt, dtype, repeats), flush=True)


def _versions(device: str) -> str:
    line = f"torch {torch.__version__}"
    if device == "cuda":
        try:
            import triton

            line += f"; triton {triton.__version__}"
        except ImportError:
            line += "; no triton"
        line = f"GPU: {torch.cuda.get_device_name()}; CUDA {torch.version.cuda}; " + line
    else:
        line = f"CPU: {cpu_name()}; threads {torch.get_num_threads()}; " + line
    return f"{line}; ghost batch norm backend: {backend_summary(device)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--kernels", action="store_true", help="also time the Triton kernels alone")
    args = parser.parse_args()
    torch.set_num_threads(2)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        print("no CUDA GPU: CPU only")
    if "cuda" in devices and args.kernels:
        print(_versions("cuda"))
        time_kernels(args.repeats)
    header = (
        "| device | input | ghost | layout | dtype | backend | BatchNorm ms | chunk loop ms | "
        "GhostBatchNorm ms | ghost / BN | ghost / chunk |"
    )
    for device in devices:
        print(_versions(device))
        extra = " ghost ops ms | ghost compiled ms |" if device == "cuda" else ""
        print(header + extra)
        print("|---" * (11 + 2 * bool(extra)) + "|")
        run(device, args.repeats)


if __name__ == "__main__":
    main()
