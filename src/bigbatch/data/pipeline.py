"""The in-memory input pipeline: the dataset is one uint8 tensor on the training device.

Each batch is indexed, augmented, converted to float and normalised there, for the whole batch at
once.

Why: for MNIST- and CIFAR-sized data a ``DataLoader`` that decodes, augments and collates per sample
in Python costs more than the training step itself on small models (see
``benchmarks/input_pipeline.py``).

Determinism (the contract every loader here follows):
  * the sample order of epoch ``e`` is ``randperm(N)`` from a generator seeded by ``(seed, e)``;
  * the augmentation parameters of step ``k`` are drawn for the *whole global batch* from a
  generator
    seeded by ``(seed, e, k)``.
So ``iterate(e, start_step=k)`` yields exactly the tail of ``iterate(e)``, and ``shard=(rank,
world)`` yields contiguous slice ``rank`` of each global batch (the slices concatenate to the global
batch). Random numbers are drawn on the CPU and moved, so the batches are the same on every device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "InMemoryLoader",
    "apply_crop_flip",
    "derive_seed",
    "random_crop_flip",
    "seeded_generator",
    "shard_bounds",
    "split_batches",
    "train_batches_per_epoch",
]

AUGMENTATIONS = ("none", "crop_flip")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers by numpy's SeedSequence (well spread, portable).

    Example:
        >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
        True
    """
    if any(p < 0 for p in parts):
        raise ValueError(f"seed parts must be >= 0, got {parts}")
    # The length goes first: SeedSequence pads short entropy with zeros, so (s, e) and (s, e, 0)
    # would otherwise give the same stream.
    state = np.random.SeedSequence([len(parts), *map(int, parts)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of ``parts``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def split_batches(order: torch.Tensor, batch_size: int, *, trim_single: bool) -> list[torch.Tensor]:
    """Cut a sample order into batches of ``batch_size``; the last one may be shorter.

    With ``trim_single`` a last batch of exactly one sample is dropped: batch norm cannot compute a
    variance from one value, so training on it would fail (or, in eval, be meaningless noise).
    """
    batches = list(order.split(batch_size))
    if trim_single and len(batches) > 1 and batches[-1].numel() == 1:
        batches.pop()
    return batches


def train_batches_per_epoch(num_samples: int, batch_size: int) -> int:
    """Training batches per epoch: ``ceil(N / B)``, less a last batch of one sample, which
    :func:`split_batches` drops.

    Example:
        >>> train_batches_per_epoch(1025, 256), train_batches_per_epoch(1026, 256)
        (4, 5)
    """
    batches = math.ceil(num_samples / batch_size)
    return batches - 1 if batches > 1 and num_samples % batch_size == 1 else batches


def shard_bounds(batch_size: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """``(start, stop)`` of contiguous slice ``rank`` of a batch split over ``world_size`` ranks.

    Slices differ in size by at most one when ``world_size`` does not divide the batch.
    """
    if shard is None:
        return 0, batch_size
    rank, world_size = shard
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}"
        )
    return batch_size * rank // world_size, batch_size * (rank + 1) // world_size


def random_crop_flip(n: int, generator: torch.Generator, padding: int = 4):
    """Draw crop offsets and flips for a batch of ``n`` samples (nothing is applied yet).

    Returns ``(dy, dx, flip)``: offsets in ``[0, 2 * padding]`` into the zero-padded image and a
    bool flip.
    """
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Random crop with zero padding then horizontal flip, vectorised over the batch.

    Equivalent to torchvision's ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip`` per sample
    (zero pixels, before normalisation), but done as one ``gather``: pad once, then read each output
    pixel from ``(dy + i, dx + j)`` of its padded image (``dx + W - 1 - j`` when flipped).

    Shape:
        images (N, C, H, W) of any dtype; dy, dx, flip (N,) on the same device. Output like
        ``images``.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    pw = w + 2 * padding
    ar_h = torch.arange(h, device=images.device)
    ar_w = torch.arange(w, device=images.device)
    rows = dy[:, None] + ar_h  # (N, H)
    cols = dx[:, None] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (N, W)
    flat = (rows[:, :, None] * pw + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, (h + 2 * padding) * pw).gather(2, flat).view(n, c, h, w)


class EpochBatches:
    """What every loader shares: ceil(N / B) batches per epoch, a seeded permutation per epoch.

    Subclasses set ``batch_size``, ``seed`` and ``train`` and define ``num_samples``. Training
    epochs are a permutation from (seed, epoch) split into batches, with a last batch of exactly
    one sample dropped (batch norm cannot train on it); evaluation keeps every sample, in order.
    """

    batch_size: int
    seed: int
    train: bool

    @property
    def num_samples(self) -> int:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def __len__(self) -> int:
        if self.train:
            return train_batches_per_epoch(self.num_samples, self.batch_size)
        return math.ceil(self.num_samples / self.batch_size)

    def batch_size_at(self, step: int) -> int:
        """Samples in step ``step`` of every epoch: ``batch_size``, fewer in the last one.

        Under DDP this is the *global* batch, of which ``iterate(..., shard=...)`` yields one
        process's slice; it is what the gradient's mean divides by.

        Example:
            >>> x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
            >>> loader = InMemoryLoader(x, torch.arange(10), batch_size=4, mean=(0,), std=(1,))
            >>> [loader.batch_size_at(k) for k in range(len(loader))]
            [4, 4, 2]
        """
        if not 0 <= step < len(self):
            raise ValueError(f"step must be in [0, {len(self)}), got {step}")
        return min(self.batch_size, self.num_samples - step * self.batch_size)

    def batch_indices(self, epoch: int) -> list[torch.Tensor]:
        """The sample indices (CPU LongTensors) of every step of ``epoch``, in order."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.train:
            order = torch.randperm(self.num_samples, generator=seeded_generator(self.seed, epoch))
        else:
            order = torch.arange(self.num_samples)
        return split_batches(order, self.batch_size, trim_single=self.train)


class InMemoryLoader(EpochBatches):
    """Batches of an in-memory uint8 dataset, augmented and normalised on the device.

    Args:
        images: uint8 (N, C, H, W) array or tensor; moved once to ``device``.
        labels: int64 (N,).
        batch_size: samples per (global) batch.
        mean, std: per-channel normalisation, in [0, 1] pixel units.
        augmentation: "none" or "crop_flip" (random 4-pixel-padded crop + horizontal flip, CIFAR
        style).
        train: shuffle each epoch, augment, and trim a last batch of one sample. ``False``
        (evaluation)
            keeps the dataset order, never augments and keeps every sample.
        seed: base of every random stream (order and augmentation).
        device: where the data and the batches live.

    Example:
        >>> import torch
        >>> x = torch.zeros(10, 1, 4, 4, dtype=torch.uint8); y = torch.arange(10)
        >>> loader = InMemoryLoader(x, y, batch_size=3, mean=(0.5,), std=(0.5,))
        >>> len(loader), [b.numel() for b in loader.batch_indices(0)]  # 10 = 3+3+3+1: 1 dropped
        (3, [3, 3, 3])
        >>> xb, yb = next(loader.iterate(0)); xb.shape, xb.dtype, float(xb[0, 0, 0, 0])
        (torch.Size([3, 1, 4, 4]), torch.float32, -1.0)
    """

    def __init__(
        self,
        images,
        labels,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        augmentation: str = "none",
        train: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        padding: int = 4,
    ):
        # Our readers return writable arrays; a caller's own read-only array (np.frombuffer, a
        # memory map) would make torch warn, so take a writable copy (only when needed).
        if isinstance(images, np.ndarray):
            images = np.require(images, requirements="W")
        if isinstance(labels, np.ndarray):
            labels = np.require(labels, requirements="W")
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise ValueError(f"mean/std need {images.shape[1]} values (one per channel)")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.augmentation = augmentation if train else "none"
        self.train = train
        self.seed = int(seed)
        self.padding = padding
        # x_norm = (x / 255 - mean) / std = x * scale + shift: two in-place ops on the float copy
        # (a broadcasting addcmul with the (1, C, 1, 1) term first measured 10x slower on CPU).
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).view(1, -1, 1, 1).to(self.device)

    @property
    def num_samples(self) -> int:
        """Size of the dataset (an epoch visits all, minus a trimmed single last sample)."""
        return self.images.shape[0]

    def iterate(
        self, epoch: int, start_step: int = 0, shard: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x float32 normalised (B, C, H, W), y int64 (B,))`` on the device for each step.

        Args:
            epoch: selects the permutation and augmentation streams.
            start_step: first step to yield (resume); steps before it cost nothing.
            shard: ``(rank, world_size)``: yield only contiguous slice ``rank`` of each global
            batch.
        """
        batches = self.batch_indices(epoch)
        if not 0 <= start_step <= len(batches):
            raise ValueError(f"start_step must be in [0, {len(batches)}], got {start_step}")
        for step in range(start_step, len(batches)):
            yield self._batch(batches[step], epoch, step, shard)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)

    def _batch(self, indices: torch.Tensor, epoch: int, step: int, shard):
        start, stop = shard_bounds(indices.numel(), shard)
        if self.augmentation == "crop_flip":
            # Drawn for the whole global batch, then sliced: every shard sees its part of the same
            # draw.
            generator = seeded_generator(self.seed, epoch, step)
            params = random_crop_flip(indices.numel(), generator, self.padding)
            params = [p[start:stop].to(self.device, non_blocking=True) for p in params]
        indices = indices[start:stop].to(self.device, non_blocking=True)
        x = self.images[indices]
        if self.augmentation == "crop_flip":
            x = apply_crop_flip(x, *params, padding=self.padding)
        x = x.float().mul_(self._scale).add_(self._shift)
        return x, self.labels[indices]
