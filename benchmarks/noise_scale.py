"""Cost of measuring the gradient noise scale during training, relative to a plain training step.

What it shows: the time of one update with gradient accumulation over micro-batches (forward and
backward per micro-batch, SGD step), done three ways with the same model and batch:
  * ``plain``: the update alone;
  * ``hooks``: plus what the engine does for ``--noise-scale``: :class:`MicroBatchGradNorms` (a
    tensor hook per parameter squares each micro-batch's gradient before it is accumulated),
    :func:`squared_grad_norm` of the accumulated gradient, one :class:`GradientNoiseScale` update
    (which reads the two norms, one host synchronisation);
  * ``hooks, every 4th update``: the same, measured on one update in 4 (``enabled`` off on the
    others), timed over 4 updates and divided by 4;
  * ``copy``: the alternative, the difference of the accumulated ``.grad`` after each micro-batch
    against a copy of it before (one extra gradient-sized buffer and a copy per micro-batch).
The target is <= 5% over ``plain``. Cases: F1 (MLP 784-512x5-10, ghost batch 128) at batch 4096 in
micro-batches of 512 and of 128, and a smaller MLP where per-parameter overheads weigh most. Runs
are interleaved (plain, hooks, copy, plain, ...) after a warm-up; the median time of the repeats
is reported; the overhead is given as the median over rounds of each round's time ratio, and as
the ratio of the fastest runs (the least disturbed on a shared machine), each minus 1.

Usage: python benchmarks/noise_scale.py [--repeats N] [--threads T] [--quick]
Results, with the machine they came from: benchmarks/RESULTS.md, section "Noise-scale overhead".
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bigbatch import models
from bigbatch.diagnostics import GradientNoiseScale, MicroBatchGradNorms, squared_grad_norm
from bigbatch.layers import convert_ghost_batchnorm
from bigbatch.machine import cpu_name

CASES = [  # (model, options, batch, micro-batch)
    ("f1", {}, 4096, 512),
    ("f1", {}, 4096, 128),
    ("f1", {"hidden": 64, "depth": 2}, 1024, 128),
]


def _make(name: str, options: dict, batch: int):
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_channels=1, image_size=28, **options)
    model = convert_ghost_batchnorm(model, ghost_batch_size=128).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    return model, opt, x, y


def _accumulate(model, opt, x, y, micro: int, after_backward=None) -> None:
    opt.zero_grad(set_to_none=True)
    k = x.shape[0] // micro
    for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
        (F.cross_entropy(model(xs), ys) / k).backward()
        if after_backward is not None:
            after_backward()


def step_plain(model, opt, x, y, micro, state) -> None:
    _accumulate(model, opt, x, y, micro)
    opt.step()


def step_hooks(model, opt, x, y, micro, state) -> None:
    norms, gns = state["norms"], state["gns"]
    _accumulate(model, opt, x, y, micro, norms.end_micro_batch)
    small = norms.pop(grad_multiplier=x.shape[0] // micro).mean()
    gns.update(small, micro, squared_grad_norm(model.parameters()), x.shape[0])
    opt.step()


def step_hooks_every_4th(model, opt, x, y, micro, state) -> None:
    """4 updates, ``hooks`` on the first only (``enabled`` off on the other 3)."""
    for update in range(4):
        state["norms"].enabled = update == 0
        (step_hooks if update == 0 else step_plain)(model, opt, x, y, micro, state)


def step_copy(model, opt, x, y, micro, state) -> None:
    params, gns = list(model.parameters()), state["gns"]
    previous: list[torch.Tensor] | None = None
    small = []

    def record() -> None:
        nonlocal previous
        grads = [p.grad for p in params]
        if previous is None:
            small.append(squared_grad_norm(params))
            previous = [g.clone() for g in grads]
        else:
            delta = torch._foreach_sub(grads, previous)
            small.append(torch.stack(torch._foreach_norm(delta)).square().sum())
            torch._foreach_copy_(previous, grads)

    _accumulate(model, opt, x, y, micro, record)
    k = x.shape[0] // micro
    gns.update(torch.stack(small).mean() * k * k, micro, squared_grad_norm(params), x.shape[0])
    opt.step()


def _time(fn, *args) -> float:
    """Seconds per update of one call (``step_hooks_every_4th`` makes 4 updates)."""
    start = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - start) / (4 if fn is step_hooks_every_4th else 1)


def run_case(name, options, batch, micro, repeats: int) -> dict[str, float]:
    """Median seconds per update of each way; its overhead over ``plain`` two ways.

    Each way has its own model copy. ``*_ratio``: the median of each round's time ratio (a round
    runs every way once, back to back, so they saw nearly the same load); ``*_min_ratio``: the
    ratio of the fastest runs (load only ever adds time, so the minima are the least disturbed).
    """
    ways = {"plain": step_plain, "hooks": step_hooks, "every4": step_hooks_every_4th,
            "copy": step_copy}
    setups = {}
    for way in ways:
        model, opt, x, y = _make(name, options, batch)
        state = {"gns": GradientNoiseScale()}
        if way in ("hooks", "every4"):
            state["norms"] = MicroBatchGradNorms(model.parameters())
        setups[way] = (model, opt, x, y, micro, state)
    for way, fn in ways.items():  # warm-up
        fn(*setups[way])
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(repeats):
        for way, fn in ways.items():
            times[way].append(_time(fn, *setups[way]))
    result = {way: statistics.median(t) for way, t in times.items()}
    for way in ("hooks", "every4", "copy"):
        result[f"{way}_ratio"] = statistics.median(
            a / b for a, b in zip(times[way], times["plain"], strict=True))
        result[f"{way}_min_ratio"] = min(times[way]) / min(times["plain"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 repeats, first case only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats, cases = (3, CASES[:1]) if args.quick else (args.repeats, CASES)
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {repeats} interleaved repeats")
    print("| model | batch | micro-batch | plain (ms) | hooks | hooks, every 4th update | copy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, options, batch, micro in cases:
        t = run_case(name, options, batch, micro, repeats)
        cells = [f"{1e3 * t[way]:.1f} ms ({100 * (t[f'{way}_ratio'] - 1):+.1f}% / "
                 f"{100 * (t[f'{way}_min_ratio'] - 1):+.1f}%)"
                 for way in ("hooks", "every4", "copy")]
        print(f"| {name} {options or ''} | {batch} | {micro} | {1e3 * t['plain']:.1f} | "
              + " | ".join(cells) + " |")
    print("(overhead over plain: median of per-round ratios / ratio of the fastest runs)")


if __name__ == "__main__":
    main()
