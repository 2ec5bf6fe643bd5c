"""Write small dataset files in the exact on-disk formats of the real datasets, for tests.

Each writer returns the arrays it wrote, so a test can check that a reader gives them back. The
formats:
  * IDX (MNIST, Fashion-MNIST): big-endian magic ``00 00 08 ndim``, one uint32 per dimension, the
  bytes.
  * CIFAR python: a protocol-2 pickle of a dict with bytes keys, as Python 2 ``cPickle`` wrote it,
  naming
    ``numpy.core.multiarray._reconstruct`` like the real files.
  * CIFAR binary: records of 1 (CIFAR-10) or 2 (CIFAR-100: coarse, fine) label bytes + 3072 pixels.
  * Image folders: ``root/<split>/<class>/<n>.png``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

IDX_TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(">i2"): 0x0B,
    np.dtype(">i4"): 0x0C,
    np.dtype(">f4"): 0x0D,
    np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array`` (uint8 or a big-endian dtype listed in IDX_TYPE_CODES)."""
    array = np.ascontiguousarray(array)
    code = IDX_TYPE_CODES[array.dtype]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.tobytes()


def write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path``, gzip-compressed when the name ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def random_images(n: int, shape: tuple[int, ...], num_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    return images, labels


def write_mnist(
    directory: Path, *, num_train: int = 30, num_test: int = 12, gz: bool = True, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write the four MNIST IDX files (28x28) into ``directory``; return {split: (x, y)}."""
    suffix = ".gz" if gz else ""
    out = {}
    for split, prefix, n in (("train", "train", num_train), ("test", "t10k", num_test)):
        images, labels = random_images(n, (28, 28), 10, seed + (split == "test"))
        write_bytes(Path(directory) / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images))
        write_bytes(
            Path(directory) / f"{prefix}-labels-idx1-ubyte{suffix}",
            idx_bytes(labels.astype(np.uint8)),
        )
        out[split] = (images[:, None], labels)
    return out


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (BINSTRING opcodes), as cPickle did for real CIFAR files.

    Python 3's protocol 2 would write bytes as ``_codecs.encode(...)`` calls, which the real files
    never contain (and which our restricted unpickler rightly refuses).
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def cifar_pickle_bytes(
    images: np.ndarray, labels: np.ndarray, label_key: str, extra: dict | None = None
) -> bytes:
    """A CIFAR python-version batch: pickle protocol 2, bytes keys, numpy.core module names."""
    batch = {
        b"batch_label": b"testing batch",
        b"data": images.reshape(len(images), -1),
        label_key.encode(): [int(v) for v in labels],
        b"filenames": [f"img_{i}.png".encode() for i in range(len(images))],
    }
    batch.update(extra or {})
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(batch)
    data = buffer.getvalue()
    # numpy 2 pickles name numpy._core; the real (numpy 1, Python 2) files name numpy.core. Protocol
    # 2 writes globals as newline-terminated text, so the substitution keeps the pickle valid.
    return data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


_CIFAR_NAMES = {
    (10, "python"): (
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
    ),
    (100, "python"): ("cifar-100-python", "cifar-100-python.tar.gz", ["train"], ["test"]),
    (10, "binary"): (
        "cifar-10-batches-bin",
        "cifar-10-binary.tar.gz",
        [f"data_batch_{i}.bin" for i in range(1, 6)],
        ["test_batch.bin"],
    ),
    (100, "binary"): ("cifar-100-binary", "cifar-100-binary.tar.gz", ["train.bin"], ["test.bin"]),
}


def cifar_member_files(num_classes: int, version: str, *, per_file: int = 4, seed: int = 0):
    """``({relative path: bytes}, {split: (images, labels)})`` of a small CIFAR dataset."""
    folder, _, train_names, test_names = _CIFAR_NAMES[(num_classes, version)]
    files, arrays = {}, {}
    for split, names in (("train", train_names), ("test", test_names)):
        parts = []
        for j, name in enumerate(names):
            images, labels = random_images(
                per_file, (3, 32, 32), num_classes, seed * 100 + j + 50 * (split == "test")
            )
            if version == "python":
                key = "labels" if num_classes == 10 else "fine_labels"
                extra = (
                    {} if num_classes == 10 else {b"coarse_labels": [int(v) // 5 for v in labels]}
                )
                files[f"{folder}/{name}"] = cifar_pickle_bytes(images, labels, key, extra)
            else:
                label_cols = (
                    [labels[:, None]]
                    if num_classes == 10
                    else [labels[:, None] // 5, labels[:, None]]
                )
                rows = np.concatenate(
                    [*(c.astype(np.uint8) for c in label_cols), images.reshape(per_file, -1)],
                    axis=1,
                )
                files[f"{folder}/{name}"] = rows.tobytes()
            parts.append((images, labels))
        arrays[split] = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    return files, arrays


def write_cifar(
    root: Path,
    num_classes: int = 10,
    version: str = "python",
    *,
    archive: bool = False,
    per_file: int = 4,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a small CIFAR-10/100 in the python or binary version, as a folder or a ``.tar.gz``."""
    root = Path(root)
    files, arrays = cifar_member_files(num_classes, version, per_file=per_file, seed=seed)
    if archive:
        write_tar_gz(root / _CIFAR_NAMES[(num_classes, version)][1], files)
    else:
        for name, data in files.items():
            write_bytes(root / name, data)
    return arrays


def tar_gz_bytes(files: dict[str, bytes]) -> bytes:
    """An in-memory .tar.gz holding ``files`` (name -> content), regular members only."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_tar_gz(path: Path, files: dict[str, bytes]) -> Path:
    """A ``.tar.gz`` of ``files`` ({member name: bytes}) with a directory entry per folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for folder in sorted({name.rsplit("/", 1)[0] for name in files if "/" in name}):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def write_image_folder(
    root: Path,
    *,
    classes=("cat", "dog", "fish"),
    per_class: dict | None = None,
    size: tuple[int, int] = (20, 14),
    seed: int = 0,
) -> dict[str, list]:
    """``root/train/<class>/<i>.png`` and ``root/val/<class>/<i>.png`` of random RGB images.

    Returns ``{split: [(path, label, uint8 HWC array), ...]}`` in sorted path order.
    """
    from PIL import Image

    per_class = per_class or {"train": 5, "val": 2}
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in per_class.items():
        out[split] = []
        for label, name in enumerate(sorted(classes)):
            for i in range(count):
                array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                path = Path(root) / split / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)
                out[split].append((path, label, array))
    return out
