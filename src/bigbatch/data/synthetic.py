"""A tiny deterministic dataset for fast tests: 10 classes of 1x8x8 uint8 images.

Each class has a fixed random template; a sample is half its class template and half uniform noise.
The classes overlap enough that a small MLP needs a few epochs, and separate enough that it ends
well above chance (10%). Everything comes from fixed seeds, so every call returns identical arrays.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SYNTHETIC_MEAN", "SYNTHETIC_STD", "SYNTHETIC_TRAIN_SIZE", "make_synthetic"]

_TEMPLATE_SEED = 20170524  # the paper's arXiv submission date; any fixed value works
_SPLIT_SEEDS = {"train": 1, "test": 2}
_NUM_CLASSES = 10
_SHAPE = (1, 8, 8)
SYNTHETIC_TRAIN_SIZE = 2048
_TEST_SIZE = 512

# Pixel statistics of the training split (computed from make_synthetic("train"); fixed by the
# seeds).
SYNTHETIC_MEAN = (0.4985,)
SYNTHETIC_STD = (0.2025,)


def make_synthetic(
    split: str = "train", num_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Generate a split of the synthetic dataset.

    Args:
        split: "train" (2048 samples by default) or "test" (512).
        num_samples: override the number of samples; the first k samples do not depend on it.

    Returns:
        ``(images uint8 (N, 1, 8, 8), labels int64 (N,))``, balanced up to rounding.

    Example:
        >>> x, y = make_synthetic("test")
        >>> x.shape, x.dtype, int(y.max())
        ((512, 1, 8, 8), dtype('uint8'), 9)
    """
    if split not in _SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
    n = num_samples if num_samples is not None else (
        SYNTHETIC_TRAIN_SIZE if split == "train" else _TEST_SIZE
    )
    if n < 0:
        raise ValueError(f"num_samples must be >= 0, got {n}")
    templates = np.random.default_rng(_TEMPLATE_SEED).uniform(0.0, 1.0, (_NUM_CLASSES, *_SHAPE))
    rng = np.random.default_rng([_TEMPLATE_SEED, _SPLIT_SEEDS[split]])
    labels = np.arange(n, dtype=np.int64) % _NUM_CLASSES
    # Draw noise per sample in a fixed order so the first k samples are the same for every n.
    noise = rng.uniform(0.0, 1.0, (n, *_SHAPE))
    images = 0.5 * templates[labels] + 0.5 * noise
    return np.round(images * 255.0).astype(np.uint8), labels
