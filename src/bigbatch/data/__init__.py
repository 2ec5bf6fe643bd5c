"""Datasets and input pipelines: readers for the real on-disk formats, verified downloads, and
loaders that produce normalised, augmented batches deterministically from (seed, epoch, step).

Example:
    >>> from bigbatch.data import build_loaders
    >>> train, val, info = build_loaders("synthetic", batch_size=128, seed=0)
    >>> x, y = next(train.iterate(epoch=0))
    >>> tuple(x.shape), info.num_classes
    ((128, 1, 8, 8), 10)
"""

from __future__ import annotations

from bigbatch.data.cifar import load_cifar_split
from bigbatch.data.custom import register_dataset, unregister_dataset
from bigbatch.data.download import download
from bigbatch.data.folder import FolderLoader
from bigbatch.data.idx import load_idx_split, read_idx
from bigbatch.data.pipeline import InMemoryLoader
from bigbatch.data.registry import (
    DATASETS,
    DatasetInfo,
    build_loaders,
    dataset_names,
    get_info,
    is_dataset,
    load_split,
)
from bigbatch.data.synthetic import make_synthetic

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "FolderLoader",
    "InMemoryLoader",
    "build_loaders",
    "dataset_names",
    "download",
    "get_info",
    "is_dataset",
    "load_cifar_split",
    "load_idx_split",
    "load_split",
    "make_synthetic",
    "read_idx",
    "register_dataset",
    "unregister_dataset",
]
