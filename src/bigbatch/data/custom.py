"""Datasets registered by users: in-memory tensor pairs, a loader function, or an image folder.

A registered dataset is an ordinary entry of :data:`bigbatch.data.DATASETS` once it is known, so
the engine's loaders, ``held_out`` / ``train_subset`` splits, normalisation and checks apply to it
as to the built-in ones. Register it in a module that ``bigbatch train --import MODULE`` imports
(or an installed package's ``bigbatch.datasets`` entry point, see :mod:`bigbatch.plugins`).

Example:
    >>> import torch
    >>> from bigbatch.data import build_loaders, register_dataset
    >>> x = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8); y = torch.arange(100) % 4
    >>> info = register_dataset("doc-tiny", train=(x, y), num_classes=4)
    >>> info.num_train, info.input_shape, info.num_classes
    (100, (1, 8, 8), 4)
    >>> train, val, _ = build_loaders("doc-tiny", batch_size=32, held_out=20)
    >>> train.num_samples, val.num_samples
    (80, 20)
    >>> unregister_dataset("doc-tiny")  # e.g. before registering it again in a notebook
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigbatch.data.registry import DATASETS, DatasetInfo
from bigbatch.errors import ConfigError, DataError

__all__ = [
    "custom_split",
    "pending_names",
    "register_dataset",
    "resolve_pending",
    "unregister_dataset",
]

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# name -> {"train": (x, y), "test": (x, y) or None} (numpy, uint8 / int64, writable)
_ARRAYS: dict[str, dict[str, Any]] = {}
# name -> (loader, keyword arguments of register_dataset): called on first use
_PENDING: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {}
_FOLDERS: dict[str, Path] = {}  # name -> ROOT


def _as_numpy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, np.ndarray):
        return np.array(value, copy=True)
    raise DataError(f"{what} must be a torch.Tensor or numpy array, got {type(value).__name__}")


def _check_pair(name: str, split: str, pair: Any, num_classes: int | None) -> tuple:
    """``(images uint8 (N, C, H, H), labels int64 (N,))`` from a user's pair, or a clear error."""
    where = f"dataset {name!r} {split}"
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise DataError(f"{where} must be a pair (images, labels), got {type(pair).__name__}")
    x, y = _as_numpy(pair[0], f"{where} images"), _as_numpy(pair[1], f"{where} labels")
    if x.ndim == 3:
        raise DataError(f"{where} images have shape {x.shape}; add the channel axis: "
                        "x.unsqueeze(1) for (N, 1, H, W)")
    if x.ndim != 4 or x.shape[2] != x.shape[3] or x.shape[0] == 0:
        raise DataError(f"{where} images must be (N, C, H, H) with N >= 1 and square images, "
                        f"got shape {x.shape}")
    if x.dtype != np.uint8:
        raise DataError(f"{where} images are {x.dtype}, expected uint8 pixels in [0, 255]; "
                        "for floats in [0, 1] pass (x * 255).round().to(torch.uint8)")
    if y.shape != (x.shape[0],):
        raise DataError(f"{where} labels must have shape ({x.shape[0]},) (one per image), got "
                        f"{y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_):
        raise DataError(f"{where} labels are {y.dtype}, expected integer class indices; "
                        "pass y.long()")
    y = y.astype(np.int64)
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where} labels span [{y.min()}, {y.max()}] but num_classes="
                        f"{num_classes}; labels must be 0 .. num_classes - 1")
    return x, y


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pixels = torch.from_numpy(x).double().div_(255).transpose(0, 1).reshape(x.shape[1], -1)
    std = pixels.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(round(v, 4) for v in pixels.mean(dim=1).tolist()), tuple(
        round(v, 4) for v in std.tolist())


def _stats(name: str, value: Sequence[float] | None, default: tuple, channels: int, what: str):
    stats = tuple(float(v) for v in (default if value is None else value))
    if len(stats) != channels or (what == "std" and min(stats) <= 0):
        raise DataError(f"dataset {name!r}: {what} must give one value per channel ({channels})"
                        + (", each > 0" if what == "std" else "") + f", got {value!r}")
    return stats


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a dataset name must be a non-empty string, got {name!r}")
    if name in DATASETS or name in _PENDING:
        raise ConfigError(f"dataset {name!r} is already registered; choose another name")


def _register_arrays(name: str, train: Any, val: Any, *, num_classes, mean, std,
                     augmentation: str) -> DatasetInfo:
    if augmentation not in ("none", "crop_flip"):
        raise DataError(f"dataset {name!r}: augmentation must be 'none' or 'crop_flip' for "
                        f"in-memory data, got {augmentation!r}")
    x, y = _check_pair(name, "train", train, num_classes)
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    test = None if val is None else _check_pair(name, "val", val, num_classes)
    if test is not None and test[0].shape[1:] != x.shape[1:]:
        raise DataError(f"dataset {name!r}: val images are {test[0].shape[1:]} but train "
                        f"images are {x.shape[1:]}; both splits need the same shape")
    # Two float64 passes over the whole training set: only for a statistic not given.
    default_mean, default_std = _channel_stats(x) if mean is None or std is None else (None, None)
    info = DatasetInfo(name, num_classes, x.shape[1], x.shape[2],
                       _stats(name, mean, default_mean, x.shape[1], "mean"),
                       _stats(name, std, default_std, x.shape[1], "std"),
                       augmentation, True, len(y))
    _ARRAYS[name] = {"train": (x, y), "test": test}
    DATASETS[name] = info
    return info


def _register_folder(name: str, folder: Any, *, mean, std, image_size: int) -> DatasetInfo:
    from bigbatch.data.folder import find_classes, scan_folder

    root = Path(folder)
    if not (root / "train").is_dir():
        raise DataError(f"dataset {name!r}: {root}/train not found; a folder dataset is ROOT with "
                        "ROOT/train/<class>/<images> (and ROOT/val/<class>/ or held_out)")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"dataset {name!r}: image_size must be a positive integer, got "
                        f"{image_size!r}")
    classes = find_classes(root / "train")
    info = DatasetInfo(name, len(classes), 3, image_size,
                       _stats(name, mean, _IMAGENET_MEAN, 3, "mean"),
                       _stats(name, std, _IMAGENET_STD, 3, "std"),
                       "imagenet", False, len(scan_folder(root / "train", classes)), str(root))
    DATASETS[name] = info
    _FOLDERS[name] = root
    return info


def register_dataset(
    name: str,
    *,
    train: Any = None,
    val: Any = None,
    loader: Callable[[], Any] | None = None,
    folder: str | Path | None = None,
    num_classes: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    augmentation: str = "none",
    image_size: int = 224,
) -> DatasetInfo | None:
    """Register a dataset under ``name`` for ``bigbatch train --dataset name`` and the engine.

    Give exactly one of ``train`` (with an optional ``val``), ``loader`` or ``folder``. Without a
    validation split a run must set ``held_out`` (validation is then taken from ``train``).

    Args:
        name: the new dataset's name.
        train: ``(images, labels)``: uint8 ``(N, C, H, H)`` images (tensor or array) and integer
            labels ``(N,)`` in ``[0, num_classes)``.
        val: the validation pair, same layout (what ``held_out=0`` validates on).
        loader: a function of no arguments returning ``(train, val)`` (``val`` may be None),
            called the first time the dataset is used (not when it is registered).
        folder: ``ROOT`` holding ``ROOT/train/<class>/<images>`` (and ``ROOT/val/<class>/``): read
            with ImageNet-style augmentation, RGB, cropped to ``image_size``.
        num_classes: label count (default: the largest train label + 1; a folder's class count).
        mean, std: per-channel normalisation in [0, 1] pixel units (default: the train set's own;
            ImageNet's for a folder).
        augmentation: in-memory data: "none" or "crop_flip" (CIFAR-style).
        image_size: crop size of a folder dataset.

    Returns:
        The :class:`~bigbatch.data.DatasetInfo` (None for a ``loader``, whose data is not read yet).

    Raises:
        DataError: a bad shape, dtype or label range (naming the fix). ConfigError: a taken name or
            not exactly one of ``train``/``loader``/``folder``.
    """
    _check_name(name)
    sources = (("train", train), ("loader", loader), ("folder", folder))
    given = [k for k, v in sources if v is not None]
    if len(given) != 1:
        raise ConfigError(f"register_dataset({name!r}): give exactly one of train=(x, y), "
                          f"loader=function or folder=ROOT, got {given or 'none'}")
    if val is not None and train is None:
        raise ConfigError(f"register_dataset({name!r}): val=(x, y) goes with train=(x, y)")
    stats = {"num_classes": num_classes, "mean": mean, "std": std, "augmentation": augmentation}
    if loader is not None:
        if not callable(loader):
            raise ConfigError(f"register_dataset({name!r}): loader must be a function")
        _PENDING[name] = (loader, stats)
        return None
    if folder is not None:
        return _register_folder(name, folder, mean=mean, std=std, image_size=image_size)
    return _register_arrays(name, train, val, **stats)


def resolve_pending(name: str) -> DatasetInfo | None:
    """Call the loader of a dataset registered with ``loader=`` (once); None if there is none."""
    if name not in _PENDING:
        return None
    loader, stats = _PENDING.pop(name)
    try:
        result = loader()
    except Exception as e:  # noqa: BLE001 - user code: one line naming the dataset
        _PENDING[name] = (loader, stats)
        raise DataError(f"the loader of dataset {name!r} failed: {type(e).__name__}: {e}") from None
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        _PENDING[name] = (loader, stats)
        raise DataError(f"the loader of dataset {name!r} must return (train, val) with train = "
                        "(images, labels) and val a pair or None")
    return _register_arrays(name, result[0], result[1], **stats)


def unregister_dataset(name: str) -> None:
    """Forget a dataset registered with :func:`register_dataset` (built-in ones stay).

    Raises:
        ConfigError: ``name`` was not registered with :func:`register_dataset`.
    """
    if not any(name in store for store in (_ARRAYS, _PENDING, _FOLDERS)):
        raise ConfigError(f"dataset {name!r} was not registered with register_dataset")
    for store in (_ARRAYS, _PENDING, _FOLDERS, DATASETS):
        store.pop(name, None)


def pending_names() -> list[str]:
    """Names registered with a loader that has not been called yet."""
    return list(_PENDING)


def custom_split(name: str, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The arrays of a registered in-memory dataset (``split`` "train" or "test"), or None."""
    arrays = _ARRAYS.get(name)
    if arrays is None:
        return None
    if arrays[split] is None:
        raise DataError(f"dataset {name!r} was registered without val=(x, y): validate on "
                        "held-out training samples with --held-out N (config key held_out)")
    x, y = arrays[split]
    return x.copy(), y.copy()
