"""The dataset registry: what each dataset is, where its files are looked for, and how the train and
validation loaders of a run are built from it.

Splits follow the paper (and the official bigBatch code): validation is the official test set. For
model selection without touching the test set, ``held_out=k`` takes validation from the training set
instead: the last ``k`` samples of one fixed permutation. ``train_subset=n`` trains on a fixed
``n``-sample subset. Both use their own fixed seed, never the run seed, so every seed of an
experiment sees the same data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bigbatch.data.cifar import cifar_present, load_cifar_split
from bigbatch.data.idx import find_idx_file, idx_file_names, load_idx_split
from bigbatch.data.pipeline import InMemoryLoader, seeded_generator
from bigbatch.data.synthetic import (
    SYNTHETIC_MEAN,
    SYNTHETIC_STD,
    SYNTHETIC_TRAIN_SIZE,
    make_synthetic,
)
from bigbatch.errors import ConfigError, DataError
from bigbatch.machine import resolve_device

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "build_loaders",
    "dataset_names",
    "find_info",
    "is_dataset",
    "get_info",
    "load_split",
    "split_indices",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Fixed seed of the held-out and subset selections (arXiv 1705.08741); independent of the run seed.
_SPLIT_SEED = 170508741


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    Attributes:
        name: registry name.
        num_classes, in_channels, image_size: label count and input shape (C, image_size,
        image_size).
        mean, std: per-channel normalisation constants of the training set, in [0, 1] pixel units.
        augmentation: "none", "crop_flip" (CIFAR: padded random crop + flip) or "imagenet".
        in_memory: whether the whole dataset is loaded as one tensor (everything but ImageNet).
        num_train: samples in the standard training split (what ``bigbatch regime`` counts
            epochs in when no ``--dataset-size`` is given).
        default_dir: where the files are looked for when no ``data_dir`` is given.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: str
    in_memory: bool
    num_train: int
    default_dir: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(in_channels, image_size, image_size)`` of one sample."""
        return (self.in_channels, self.image_size, self.image_size)


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), "none", True, 60000),
        DatasetInfo(
            "fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), "none", True, 60000,
            FASHION_MNIST_DIR,
        ),
        DatasetInfo(
            "cifar10",
            10,
            3,
            32,
            (0.4914, 0.4822, 0.4465),
            (0.2470, 0.2435, 0.2616),
            "crop_flip",
            True,
            50000,
        ),
        DatasetInfo(
            "cifar100",
            100,
            3,
            32,
            (0.5071, 0.4865, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "crop_flip",
            True,
            50000,
        ),
        DatasetInfo(
            "imagenet",
            1000,
            3,
            224,
            (0.485, 0.456, 0.406),
            (0.229, 0.224, 0.225),
            "imagenet",
            False,
            1281167,
        ),
        DatasetInfo("synthetic", 10, 1, 8, SYNTHETIC_MEAN, SYNTHETIC_STD, "none", True,
                    SYNTHETIC_TRAIN_SIZE),
    )
}

# Extra sub-folders searched under data_dir (torchvision's layout, so existing downloads are
# reused).
_SUBDIRS = {"mnist": ("MNIST/raw",), "fashion-mnist": ("FashionMNIST/raw", "fashion_mnist")}

_HOW_TO_GET = {
    "fashion-mnist": "install the Debian package dataset-fashion-mnist (sudo apt-get install "
    "dataset-fashion-mnist), or pass --data-dir DIR holding the four IDX files, or "
    "--download --data-dir DIR",
    "mnist": "pass --data-dir DIR holding the four IDX files (.gz or not), or "
    "--download --data-dir DIR",
    "cifar10": "pass --data-dir DIR holding cifar-10-python.tar.gz or cifar-10-batches-py/ (or the "
    "binary version), or --download --data-dir DIR",
    "cifar100": "pass --data-dir DIR holding cifar-100-python.tar.gz or cifar-100-python/ (or the "
    "binary version), or --download --data-dir DIR",
}


def is_dataset(name: str) -> bool:
    """Whether ``name`` is a known dataset, loading the ``bigbatch.datasets`` entry points (once)
    on a miss; a dataset registered with a loader is not loaded."""
    from bigbatch.data.custom import pending_names
    from bigbatch.plugins import load_entry_points

    if name in DATASETS or name in pending_names():
        return True
    load_entry_points("bigbatch.datasets")
    return name in DATASETS or name in pending_names()


def find_info(name: str) -> DatasetInfo | None:
    """The :class:`DatasetInfo` of ``name`` (a registered loader is called now), or None."""
    from bigbatch.data.custom import resolve_pending

    if not is_dataset(name):
        return None
    return DATASETS.get(name) or resolve_pending(name)


def dataset_names() -> list[str]:
    """Sorted names of every known dataset: built-in, registered and from entry points."""
    from bigbatch.data.custom import pending_names
    from bigbatch.plugins import load_entry_points

    load_entry_points("bigbatch.datasets")
    return sorted({*DATASETS, *pending_names()})


def get_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; an unknown name raises ConfigError listing them."""
    info = find_info(name)
    if info is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {dataset_names()}")
    return info


def _search_dirs(info: DatasetInfo, data_dir: str | Path | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        root = Path(data_dir)
        if root.exists() and not root.is_dir():
            raise DataError(
                f"{root}: is a file, but --data-dir must be a directory (it may contain "
                f"a {info.name}/ folder)"
            )
        dirs += [root, root / info.name] + [root / sub for sub in _SUBDIRS.get(info.name, ())]
        # An explicit directory is the user's choice: never fall back to the default one behind
        # their back (a typo in --data-dir would otherwise silently train on other files).
        return dirs
    if info.default_dir is not None:
        dirs.append(Path(info.default_dir))
    return dirs


def _present(info: DatasetInfo, directory: Path, split: str) -> bool:
    if not directory.is_dir():
        return False
    if info.name in ("mnist", "fashion-mnist"):
        return find_idx_file(directory, idx_file_names(split)[0]) is not None
    return cifar_present(directory, split, info.num_classes)


def load_split(
    name: str, data_dir: str | Path | None = None, split: str = "train", download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of an in-memory dataset.

    Files are looked for in ``data_dir``, ``data_dir/<name>`` (and torchvision's sub-folders) when
    ``data_dir`` is given, otherwise in the dataset's ``default_dir`` (Fashion-MNIST: the Debian
    package's ``/usr/share/datasets/fashion-mnist``).

    Args:
        name: a key of :data:`DATASETS` other than "imagenet".
        data_dir: where to look (and where ``download`` writes, into ``data_dir/<name>``).
        split: "train" or "test" (the official test set).
        download: fetch the files (SHA-256 verified) if they are not found.

    Returns:
        ``(images uint8 (N, C, H, W), labels int64 (N,))``.

    Raises:
        DataError: files missing (the message says how to get them) or corrupt.

    Example:
        >>> x, y = load_split("synthetic", split="test")
        >>> x.shape, y.dtype
        ((512, 1, 8, 8), dtype('int64'))
    """
    info = get_info(name)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if not info.in_memory:
        raise DataError(
            f"{name} is read from image folders; use build_loaders({name!r}, data_dir=...)"
        )
    if name == "synthetic":
        return make_synthetic(split)
    from bigbatch.data.custom import custom_split

    registered = custom_split(name, split)
    if registered is not None:
        return registered
    dirs = _search_dirs(info, data_dir)
    found = next((d for d in dirs if _present(info, d, split)), None)
    if found is None and download:
        if data_dir is None:
            raise DataError(f"--download needs --data-dir: where should {name} be written?")
        from bigbatch.data.download import download as fetch_dataset

        found = fetch_dataset(name, data_dir)
    if found is None:
        tried = ", ".join(str(d) for d in dirs) or "nowhere (no --data-dir given)"
        raise DataError(f"{name} {split} files not found (looked in {tried}); {_HOW_TO_GET[name]}")
    if name in ("mnist", "fashion-mnist"):
        images, labels = load_idx_split(found, split)
    else:
        images, labels = load_cifar_split(found, split, info.num_classes)
    if labels.size and (labels.min() < 0 or labels.max() >= info.num_classes):
        raise DataError(
            f"{found}: {split} labels span [{labels.min()}, {labels.max()}] but {name} has "
            f"{info.num_classes} classes; is this the right dataset?"
        )
    expected = (info.in_channels, info.image_size, info.image_size)
    if images.shape[1:] != expected:
        raise DataError(
            f"{found}: {split} images have shape {images.shape[1:]}, expected {expected}"
        )
    return images, labels


def split_indices(
    num_samples: int, *, held_out: int = 0, train_subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Indices of the training samples and the held-out validation samples (None if no held_out).

    The held-out set is the last ``held_out`` entries of one fixed permutation; the subset is the
    first ``train_subset`` entries of another fixed permutation of what remains. Both are sorted and
    depend only on ``num_samples``, ``held_out`` and ``train_subset``: never on the run seed.

    Example:
        >>> train, val = split_indices(10, held_out=3, train_subset=4)
        >>> len(train), len(val), set(train.tolist()) & set(val.tolist())
        (4, 3, set())
    """
    if not isinstance(held_out, int) or not 0 <= held_out < num_samples:
        raise ConfigError(f"held_out must be an integer in [0, {num_samples}), got {held_out!r}")
    order = torch.randperm(num_samples, generator=seeded_generator(_SPLIT_SEED, 0))
    train, val = order[: num_samples - held_out], order[num_samples - held_out :]
    if train_subset is not None:
        if not isinstance(train_subset, int) or not 0 < train_subset <= train.numel():
            raise ConfigError(
                f"train_subset must be an integer in [1, {train.numel()}] (the training "
                f"samples left after held_out={held_out}), got {train_subset!r}"
            )
        pick = torch.randperm(train.numel(), generator=seeded_generator(_SPLIT_SEED, 1))[
            :train_subset
        ]
        train = train[pick]
    return train.sort().values, (val.sort().values if held_out else None)


def build_loaders(
    dataset: str,
    *,
    data_dir: str | Path | None = None,
    batch_size: int,
    eval_batch_size: int = 1024,
    device: str | torch.device = "cpu",
    seed: int = 0,
    train_subset: int | None = None,
    held_out: int = 0,
    download: bool = False,
    num_workers: int = 2,
    image_size: int | None = None,
):
    """Build the training and validation loaders of a run.

    Args:
        dataset: a key of :data:`DATASETS`.
        data_dir: where the files are (required for ImageNet: ``data_dir/train`` and
        ``data_dir/val``).
        batch_size: global training batch size.
        eval_batch_size: validation batch size (no effect on results).
        device: where batches are produced ("cpu", "cuda", "cuda:1", "auto").
        seed: run seed: training order and augmentation (not the subset / held-out choice).
        train_subset: train on this many samples of a fixed subset.
        held_out: validate on this many samples held out of the training set instead of the test
        set.
        download: download missing MNIST/Fashion-MNIST/CIFAR files into ``data_dir``.
        num_workers: image-decoding processes (ImageNet only).
        image_size: crop size for ImageNet (default 224); the returned info carries it.

    Returns:
        ``(train_loader, val_loader, info)``: loaders with ``len``, ``num_samples``, ``batch_size``,
        ``iterate(epoch, start_step=0, shard=None)`` and ``batch_indices(epoch)``.

    Raises:
        ConfigError: bad held_out / train_subset. DataError: missing or corrupt files.

    Example:
        >>> train, val, info = build_loaders("synthetic", batch_size=256)
        >>> len(train), len(val), info.num_classes
        (8, 1, 10)
    """
    info = get_info(dataset)
    device = resolve_device(device)
    if not info.in_memory:
        return _build_folder_loaders(
            info,
            data_dir,
            batch_size,
            eval_batch_size,
            device,
            seed,
            train_subset,
            held_out,
            num_workers,
            image_size,
        )
    images, labels = load_split(dataset, data_dir, "train", download)
    train_idx, val_idx = split_indices(len(labels), held_out=held_out, train_subset=train_subset)
    if val_idx is None:
        val_images, val_labels = load_split(dataset, data_dir, "test", download)
    else:
        val_images, val_labels = images[val_idx.numpy()], labels[val_idx.numpy()]
    common = dict(mean=info.mean, std=info.std, seed=seed, device=device)
    train = InMemoryLoader(
        images[train_idx.numpy()],
        labels[train_idx.numpy()],
        batch_size=batch_size,
        augmentation=info.augmentation,
        train=True,
        **common,
    )
    val = InMemoryLoader(val_images, val_labels, batch_size=eval_batch_size, train=False, **common)
    return train, val, info


def _build_folder_loaders(
    info,
    data_dir,
    batch_size,
    eval_batch_size,
    device,
    seed,
    train_subset,
    held_out,
    num_workers,
    image_size,
):
    from bigbatch.data.folder import FolderLoader, find_classes, scan_folder

    data_dir = data_dir if data_dir is not None else info.default_dir  # a registered folder
    if data_dir is None:
        raise DataError(
            f"{info.name} needs --data-dir ROOT with ROOT/train/<class>/*.JPEG and "
            "ROOT/val/<class>/*.JPEG (it cannot be downloaded automatically)"
        )
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise DataError(
            f"{root}: is a file, expected a directory with train/ and val/ class folders"
        )
    classes = find_classes(root / "train")
    samples = scan_folder(root / "train", classes)
    train_idx, val_idx = split_indices(len(samples), held_out=held_out, train_subset=train_subset)
    val_samples = (
        [samples[i] for i in val_idx.tolist()]
        if val_idx is not None
        else scan_folder(root / "val", classes)
    )
    size = image_size or info.image_size
    info = replace(info, num_classes=len(classes), image_size=size)
    common = dict(
        mean=info.mean,
        std=info.std,
        image_size=size,
        seed=seed,
        device=device,
        num_workers=num_workers,
    )
    train = FolderLoader(
        [samples[i] for i in train_idx.tolist()], batch_size=batch_size, train=True, **common
    )
    val = FolderLoader(val_samples, batch_size=eval_batch_size, train=False, **common)
    return train, val, info
