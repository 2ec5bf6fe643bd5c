"""Input-pipeline throughput, and its share of a training step.

What it shows: the on-device in-memory pipeline (bigbatch.data.InMemoryLoader: index a uint8 tensor,
random crop + flip for the whole batch in one gather, normalise) against the usual torch DataLoader
over the same tensors (TensorDataset, per-sample crop + flip + normalise in the collate function, in
the main process); then the time the pipeline takes as a fraction of a full training step (pipeline
+ forward + backward + SGD) for F1 (MLP 784-512x5-10 with BN, 28x28) and ResNet44 (32x32). Target:
under 5%.

Method: CIFAR-shaped data (50000x3x32x32 random uint8), 2 threads, the two pipelines measured in
alternation, median over repeats. Run: ``python benchmarks/input_pipeline.py`` (about 2 minutes on 2
cores); results are recorded in benchmarks/RESULTS.md with the machine.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from bigbatch.data import InMemoryLoader
from bigbatch.machine import cpu_name

# Threads: argv[1] (default 2). On a machine whose cores are busy with other work, use 1: torch's
# OpenMP workers spin-wait for each other and parallel ops on small tensors slow down ~50x.
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _collate_augment(batch):
    """The usual per-sample path: pad, random crop, random flip, normalise, one image at a time."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    images, labels = [], []
    for x, y in batch:
        padded = F.pad(x, (4, 4, 4, 4))
        dy, dx = torch.randint(0, 9, (2,)).tolist()
        crop = padded[:, dy : dy + 32, dx : dx + 32]
        if torch.rand(()) < 0.5:
            crop = crop.flip(2)
        images.append((crop.float() / 255 - mean) / std)
        labels.append(y)
    return torch.stack(images), torch.stack(labels)


def _time_batches(iterator, num_batches: int) -> float:
    """Seconds per sample to draw ``num_batches`` batches from ``iterator``."""
    start = time.perf_counter()
    samples = 0
    for _ in range(num_batches):
        x, _ = next(iterator)
        samples += x.shape[0]
    return (time.perf_counter() - start) / samples


def throughput(images, labels, batch_size: int, repeats: int = 5) -> dict:
    ours = InMemoryLoader(
        images, labels, batch_size=batch_size, mean=MEAN, std=STD, augmentation="crop_flip", seed=0
    )
    theirs = DataLoader(
        TensorDataset(images, labels),
        batch_size=batch_size,
        shuffle=True,
        collate_fn=_collate_augment,
        num_workers=0,
    )
    num_batches = max(1, 8192 // batch_size)
    ours_t, theirs_t = [], []
    for r in range(repeats):  # interleaved, so drifts in machine load hit both equally
        ours_t.append(_time_batches(ours.iterate(r), num_batches))
        theirs_t.append(_time_batches(iter(theirs), num_batches))
    return {"ours": 1 / statistics.median(ours_t), "dataloader": 1 / statistics.median(theirs_t)}


def step_fraction(
    model, images, labels, batch_size: int, augmentation: str, repeats: int = 5, mean=MEAN, std=STD
) -> dict:
    loader = InMemoryLoader(
        images, labels, batch_size=batch_size, mean=mean, std=std, augmentation=augmentation, seed=0
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    batches = (batch for epoch in itertools.count() for batch in loader.iterate(epoch))
    x, y = next(batches)  # warm-up
    F.cross_entropy(model(x), y).backward()
    data_t, step_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        t2 = time.perf_counter()
        data_t.append(t1 - t0)
        step_t.append(t2 - t0)
    data, step = statistics.median(data_t), statistics.median(step_t)
    return {"data_ms": 1e3 * data, "step_ms": 1e3 * step, "fraction": data / step}


def _models():
    try:
        from bigbatch.models import create

        return (
            create("f1", num_classes=10, in_channels=1, image_size=28),
            create("resnet44", num_classes=10),
            "bigbatch.models.create",
        )
    except (ImportError, AttributeError) as exc:
        raise SystemExit(
            f"bigbatch.models not available ({exc}); this benchmark needs it"
        ) from None


def main() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50000, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (50000,), generator=g)
    print(
        f"# machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    print("| batch | in-memory pipeline (samples/s) | DataLoader, per-sample aug | ratio |")
    print("|---:|---:|---:|---:|")
    for batch_size in (128, 4096):
        r = throughput(images, labels, batch_size)
        print(
            f"| {batch_size} | {r['ours']:,.0f} | {r['dataloader']:,.0f} | "
            f"{r['ours'] / r['dataloader']:.1f}x |"
        )
    f1, resnet44, source = _models()
    mnist = torch.randint(0, 256, (10000, 1, 28, 28), generator=g, dtype=torch.uint8)
    mnist_y = torch.randint(0, 10, (10000,), generator=g)
    print(f"\n# step fraction (models from {source}, CPU, median of 5 steps)")
    print("| model | batch | pipeline ms | full step ms | pipeline share |")
    print("|---|---:|---:|---:|---:|")
    cases = [
        ("F1 (MLP, 28x28)", f1, mnist, mnist_y, 128, "none", (0.286,), (0.353,)),
        ("F1 (MLP, 28x28)", f1, mnist, mnist_y, 4096, "none", (0.286,), (0.353,)),
        ("ResNet44 (32x32, crop+flip)", resnet44, images, labels, 128, "crop_flip", MEAN, STD),
    ]
    for name, model, x, y, batch_size, aug, mean, std in cases:
        r = step_fraction(model, x, y, batch_size, aug, mean=mean, std=std)
        print(
            f"| {name} | {batch_size} | {r['data_ms']:.2f} | {r['step_ms']:.1f} | "
            f"{100 * r['fraction']:.1f}% |"
        )


if __name__ == "__main__":
    main()
