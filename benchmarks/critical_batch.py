"""Critical batch size from training runs, against the gradient noise scale measured in them.

What it shows (issue 16, item 5): F1 trained at batch sizes 64 ... 8192 (x2 steps), each with the
best lr of a small grid (``lr0 * sqrt(B / 64) * {0.5, 1, 2}``, SGD momentum 0.9, constant lr), to a
fixed validation-error target. For each batch size it records the updates ``S`` and examples
``E = S * B`` to reach the target; a least-squares fit of McCandlish et al.'s ``S = S_min (1 +
B_crit / B)`` (linear in ``1 / B``) gives ``S_min``, ``E_min = S_min * B_crit`` and ``B_crit``,
which is compared with ``B_simple`` measured during the same runs (the one-shot
:func:`~bigbatch.diagnostics.estimate_noise_scale` on 2048 training examples in small batches of
64, at every 4th evaluation; the median over each run). The ratios are reported as measured.

The ``LB+GBN+AS`` vs ``LB+LR+GBN+RA`` comparison is ``benchmarks/adascale_vs_ra.py``. ``--plot
PNG`` draws S and E against B with the fit and the measured B_simple; ``--table FILE`` redraws it
from this script's saved output instead of training. ``--quick`` uses a synthetic task (a linear
teacher on 32-d codes embedded in 784-d inputs), a narrow F1, batch sizes 64 ... 512 and a 2-point
lr grid on 1 thread: it checks the script, not the science.

Usage: python benchmarks/critical_batch.py --data-dir DIR_WITH_FASHION_MNIST_IDX [--subset N]
           [--plot critical_batch.png]
       python benchmarks/critical_batch.py --table saved_output.txt --plot critical_batch.png
       python benchmarks/critical_batch.py --quick
Results, with the machine they came from: benchmarks/RESULTS.md, section "Critical batch".
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from bigbatch import models
from bigbatch.diagnostics import estimate_noise_scale
from bigbatch.machine import cpu_name


def load_fashion_mnist(directory: str, subset: int | None):
    """Train and test tensors (N, 1, 28, 28) scaled to mean 0, std 1; the first ``subset``."""
    from bigbatch.data.idx import load_idx_split

    out = []
    for split in ("train", "test"):
        images, labels = load_idx_split(directory, split)
        x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        out += [x, torch.from_numpy(np.asarray(labels, dtype=np.int64))]
    mean, std = out[0].mean(), out[0].std()
    out[0], out[2] = (out[0] - mean) / std, (out[2] - mean) / std
    if subset:
        out[0], out[1] = out[0][:subset], out[1][:subset]
    return out


def synthetic_task(n_train: int, n_val: int, seed: int = 0):
    """Linear-teacher labels of 32-d Gaussian codes, embedded in 784-d inputs (for ``--quick``)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(n_train + n_val, 32, generator=g)
    embed, teacher = torch.randn(32, 784, generator=g) / 32**0.5, torch.randn(32, 10, generator=g)
    x = (codes @ embed).reshape(-1, 1, 28, 28)
    y = (codes @ teacher).argmax(1)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def _val_error(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        wrong = sum(int((model(xs).argmax(1) != ys).sum())
                    for xs, ys in zip(x.split(4096), y.split(4096), strict=True))
    model.train()
    return wrong / len(y)


def train_to_target(data, batch: int, lr: float, args) -> tuple[int | None, list[float]]:
    """Updates to reach ``args.target`` validation error (None if not within the epochs)."""
    x, y, xv, yv = data
    torch.manual_seed(args.seed)
    model = models.create("f1", num_classes=10, in_channels=1, image_size=28,
                          hidden=args.hidden, depth=args.depth).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(args.seed)
    probe = torch.randperm(len(x), generator=g)[:args.probe_size]
    eval_every = max(1, args.eval_samples // batch)
    b_simple, updates = [], 0
    for _ in range(args.max_epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch):
            if len(idx) < batch:
                continue  # equal batches only: S counts updates of exactly B examples
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            updates += 1
            if updates % eval_every:
                continue
            if updates % (eval_every * args.noise_every) == 0:
                est = estimate_noise_scale(model, F.cross_entropy, [(x[probe], y[probe])], 64)
                if math.isfinite(est.b_simple):
                    b_simple.append(est.b_simple)
            error = _val_error(model, xv, yv)
            if not math.isfinite(error) or error <= args.target:
                return (updates if math.isfinite(error) else None), b_simple
    return None, b_simple


def fit_tradeoff(batch_sizes, updates, relative: bool = False) -> tuple[float, float, float]:
    """``(S_min, E_min, B_crit)`` from a least-squares fit of ``S = S_min + E_min / B``.

    ``relative``: minimise the relative residuals (each row weighted by ``1 / S``), so the few
    updates of the large batches count as much as the many of the small ones.
    """
    inv_b = np.array([1.0 / b for b in batch_sizes])
    updates = np.array(updates, dtype=float)
    weight = 1.0 / updates if relative else np.ones_like(updates)
    design = np.stack([np.ones_like(inv_b), inv_b], axis=1) * weight[:, None]
    (s_min, e_min), *_ = np.linalg.lstsq(design, updates * weight, rcond=None)
    return float(s_min), float(e_min), float(e_min / s_min) if s_min > 0 else math.nan


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="directory with Fashion-MNIST's IDX files")
    p.add_argument("--subset", type=int, default=None, help="first N training examples")
    p.add_argument("--quick", action="store_true", help="synthetic task, ~1 minute")
    p.add_argument("--target", type=float, default=0.15, help="validation error to reach")
    p.add_argument("--lr0", type=float, default=0.05, help="lr at batch 64 (grid centre)")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--eval-samples", type=int, default=8192, help="examples between evaluations")
    p.add_argument("--noise-every", type=int, default=4, help="evaluations between B_simple "
                   "measurements (each costs probe-size / 64 forward and backward passes)")
    p.add_argument("--probe-size", type=int, default=2048, help="examples per B_simple estimate")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--plot", help="write the figure (PNG) here")
    p.add_argument("--table", help="redraw from this script's saved output (no training)")
    args = p.parse_args()
    if args.quick:
        args.hidden, args.depth, args.max_epochs, args.eval_samples = 32, 1, 10, 1024
        args.probe_size, args.threads = 512, 1
        args.noise_every = 1
        args.target = 0.12 if args.target == 0.15 else args.target  # unless given
    elif not args.data_dir and not args.table:
        p.error("give --data-dir with Fashion-MNIST (bigbatch data download fashion-mnist), "
                "or --quick")
    return args


def _read_table(path: str) -> list[tuple[int, int, float]]:
    """``(batch, updates, median B_simple)`` of each reached row of a saved output."""
    rows = []
    for line in open(path, encoding="utf-8"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].isdigit() and cells[2].isdigit():
            rows.append((int(cells[0]), int(cells[2]), float(cells[4])))
    return rows


def plot(reached: list[tuple[int, int, float]], path: str, title: str) -> None:
    """S and E against B (log-log) with the fitted trade-off, B_crit and the median B_simple."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = np.array([r[0] for r in reached], dtype=float)
    updates = np.array([r[1] for r in reached], dtype=float)
    s_min, e_min, b_crit = fit_tradeoff(batch, updates, relative=True)
    finite = [r[2] for r in reached if math.isfinite(r[2])]
    b_simple = statistics.median(finite) if finite else math.nan
    grid = np.geomspace(batch[0], batch[-1], 100)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, measured, fitted, label in ((axes[0], updates, s_min + e_min / grid, "updates S"),
                                        (axes[1], updates * batch, s_min * grid + e_min,
                                         "examples E = S B")):
        ax.loglog(batch, measured, "o", label="measured (best lr of the grid)")
        if s_min > 0:
            ax.loglog(grid, fitted, "-", label=f"relative fit: S_min {s_min:.3g}, E_min "
                      f"{e_min:.3g}")
            ax.axvline(b_crit, color="C2", ls="--", label=f"B_crit = E_min/S_min = {b_crit:.0f}")
        if math.isfinite(b_simple):
            ax.axvline(b_simple, color="C3", ls=":", label=f"median B_simple = {b_simple:.0f}")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"figure: {path}")


def main() -> None:
    args = _parse()
    if args.table:
        if not args.plot:
            raise SystemExit("--table redraws a figure: give --plot PNG")
        with open(args.table, encoding="utf-8") as f:
            first = f.readline().lstrip("# ").strip()  # the machine and the settings
        plot(_read_table(args.table), args.plot, first)
        return
    torch.set_num_threads(args.threads)
    data = synthetic_task(4096, 1024) if args.quick else \
        load_fashion_mnist(args.data_dir, args.subset)
    sizes = [64 * 2**i for i in range(4 if args.quick else 8)]
    print(f"# {cpu_name()}, {args.threads} threads, torch {torch.__version__}, seed {args.seed}, "
          f"{'synthetic' if args.quick else 'Fashion-MNIST'} ({len(data[0])} train), F1 hidden "
          f"{args.hidden} depth {args.depth}, target val error {args.target}")
    print("| batch | best lr | updates S | examples E | median B_simple | seconds |")
    print("|---:|---:|---:|---:|---:|---:|")
    reached = []
    for batch in sizes:
        start, best = time.perf_counter(), None
        for factor in (1.0, 2.0) if args.quick else (0.5, 1.0, 2.0):
            lr = args.lr0 * math.sqrt(batch / 64) * factor
            updates, b_simple = train_to_target(data, batch, lr, args)
            if updates is not None and (best is None or updates < best[1]):
                best = (lr, updates, b_simple)
        if best is None:
            print(f"| {batch} | - | not reached in {args.max_epochs} epochs | | | "
                  f"{time.perf_counter() - start:.0f} |")
            continue
        lr, updates, b_simple = best
        med = statistics.median(b_simple) if b_simple else math.nan
        reached.append((batch, updates, med))
        print(f"| {batch} | {lr:.3g} | {updates} | {updates * batch} | {med:.4g} | "
              f"{time.perf_counter() - start:.0f} |")
    if len(reached) >= 2:
        s_min, e_min, b_crit = fit_tradeoff([r[0] for r in reached], [r[1] for r in reached])
        finite = [r[2] for r in reached if math.isfinite(r[2])]
        b_simple = statistics.median(finite) if finite else math.nan
        if not s_min > 0:
            print(f"the fit gives S_min = {s_min:.4g} <= 0: these runs do not follow "
                  f"S = S_min (1 + B_crit / B) (a finer lr grid or a stricter target may help)")
        print(f"fit S = S_min (1 + B_crit / B): S_min = {s_min:.4g}, E_min = {e_min:.4g}, "
              f"B_crit = {b_crit:.4g}; median B_simple over the runs = {b_simple:.4g} "
              f"(B_crit / B_simple = {b_crit / b_simple:.3g})")
        s_min, e_min, b_crit = fit_tradeoff([r[0] for r in reached], [r[1] for r in reached],
                                            relative=True)
        print(f"relative fit (rows weighted 1/S): S_min = {s_min:.4g}, E_min = {e_min:.4g}, "
              f"B_crit = {b_crit:.4g} (B_crit / B_simple = {b_crit / b_simple:.3g})")
        if args.plot:
            plot(reached, args.plot, f"F1 on {'synthetic' if args.quick else 'Fashion-MNIST'}, "
                 f"target val error {args.target}")


if __name__ == "__main__":
    main()
