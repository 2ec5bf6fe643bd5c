"""ImageNet-style class-per-folder datasets, decoded with Pillow in ``DataLoader`` workers.

Layout: ``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` (any of the usual extensions).

Augmentation is the standard ImageNet recipe (as in the official bigBatch code, which used
torchvision), written here on PIL images because torchvision is not a dependency:
  * train: random-resized crop (area 8%-100% of the image, aspect ratio 3/4-4/3), resized to
    ``image_size``, then a horizontal flip with probability 1/2;
  * eval: resize the shorter side to ``image_size / 0.875`` (256 for 224), then a centre crop.
Workers return uint8 tensors (4x less to move than float); conversion and normalisation happen on
the training device, as in :mod:`bigbatch.data.pipeline`.

Determinism follows the same contract as :class:`~bigbatch.data.pipeline.InMemoryLoader`: the order
of epoch ``e`` comes from ``(seed, e)``, and the augmentation of position ``i`` of global batch
``k`` from ``(seed, e, k, i)``, so neither the number of workers nor sharding nor resuming changes
any sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from bigbatch.data.pipeline import EpochBatches, derive_seed, shard_bounds
from bigbatch.errors import DataError

__all__ = [
    "FolderDataset",
    "FolderLoader",
    "center_crop",
    "find_classes",
    "random_resized_crop",
    "scan_folder",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")
_EVAL_CROP_FRACTION = 0.875


def find_classes(directory: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``directory``."""
    if not directory.exists():
        raise DataError(
            f"{directory}: directory not found; expected <root>/train/<class>/*.JPEG and "
            "<root>/val/<class>/*.JPEG"
        )
    if not directory.is_dir():
        raise DataError(f"{directory}: is a file, expected a directory of class folders")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{directory}: no class folders (expected {directory}/<class>/<image>)")
    return classes


def scan_folder(
    directory: str | Path, classes: Sequence[str] | None = None
) -> list[tuple[Path, int]]:
    """List ``(path, class_index)`` of every image under ``directory/<class>/``, sorted by path.

    Args:
        directory: the split folder (e.g. ``root/train``).
        classes: the class names defining the label indices (pass the training classes when scanning
            ``val`` so labels agree); default: the sub-folders of ``directory``.
    """
    directory = Path(directory)
    found = find_classes(directory)
    classes = list(found if classes is None else classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{directory}: class folders {unknown[:5]} do not exist in the training set"
        )
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for name in found:
        for path in sorted((directory / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                samples.append((path, index[name]))
    if not samples:
        raise DataError(f"{directory}: no images with extensions {IMAGE_EXTENSIONS}")
    return samples


def random_resized_crop(
    image: Image.Image, size: int, rng: np.random.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> Image.Image:
    """Crop a random area fraction in ``scale``, aspect ratio in ``ratio``, resized to ``size``.

    The ratio is drawn log-uniformly. After 10 failed draws falls back to the largest centred crop
    within ``ratio`` (the torchvision ``RandomResizedCrop`` algorithm).
    """
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size / 0.875`` then take the central ``size x size`` crop."""
    width, height = image.size
    short = max(size, int(round(size / _EVAL_CROP_FRACTION)))
    if width <= height:
        new_w, new_h = short, max(short, int(round(height * short / width)))
    else:
        new_w, new_h = max(short, int(round(width * short / height))), short
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


class FolderDataset(Dataset):
    """Decodes one image per key ``(index, aug_seed)``; ``aug_seed=None`` means evaluation."""

    def __init__(self, samples: Sequence[tuple[Path, int]], image_size: int = 224):
        self.samples = list(samples)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        index, aug_seed = key
        path, label = self.samples[index]
        try:
            with Image.open(path) as raw:
                image = raw.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(
                f"{path}: cannot decode image ({exc}); delete or replace the file"
            ) from None
        if aug_seed is None:
            image = center_crop(image, self.image_size)
        else:
            rng = np.random.default_rng(aug_seed)
            image = random_resized_crop(image, self.image_size, rng)
            if rng.uniform() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), label


class FolderLoader(EpochBatches):
    """Batches of a class-per-folder image dataset via a ``DataLoader``; the InMemoryLoader API.

    Args:
        samples: ``(path, label)`` pairs, e.g. from :func:`scan_folder`.
        batch_size, mean, std, train, seed, device: as for ``InMemoryLoader``.
        image_size: side of the square output crops (224 for ImageNet; tests use 8-16).
        num_workers: decoding processes (0 decodes in the calling process).
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        image_size: int = 224,
        train: bool = True,
        seed: int = 0,
        device: str | torch.device = "cpu",
        num_workers: int = 2,
    ):
        if batch_size < 1 or image_size < 1 or num_workers < 0 or seed < 0:
            raise ValueError(
                f"need batch_size >= 1, image_size >= 1, num_workers >= 0, seed >= 0; got "
                f"{batch_size}, {image_size}, {num_workers}, {seed}"
            )
        if not samples:
            raise ValueError("no samples")
        self.dataset = FolderDataset(samples, image_size)
        self.batch_size = int(batch_size)
        self.train = train
        self.seed = int(seed)
        self.device = torch.device(device)
        self.num_workers = num_workers
        std_t = torch.tensor(std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (
            (-torch.tensor(mean, dtype=torch.float32) / std_t).view(1, -1, 1, 1).to(self.device)
        )

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def iterate(
        self, epoch: int, start_step: int = 0, shard: tuple[int, int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batch_indices(epoch)
        if not 0 <= start_step <= len(batches):
            raise ValueError(f"start_step must be in [0, {len(batches)}], got {start_step}")
        keys = []
        for step in range(start_step, len(batches)):
            indices = batches[step].tolist()
            start, stop = shard_bounds(len(indices), shard)
            keys.append(
                [
                    (indices[i], derive_seed(self.seed, epoch, step, i) if self.train else None)
                    for i in range(start, stop)
                ]
            )
        loader = DataLoader(
            self.dataset,
            batch_sampler=keys,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            yield (
                x.float().mul_(self._scale).add_(self._shift),
                y.to(self.device, non_blocking=True),
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate(0)
